//! The exact-text cache in front of every model: the very common messages
//! ("hi", "thanks", "你好") are understood once. Keys are normalized
//! ([`key`]); the least recently used entry goes when it is full. A cache of
//! size 0 keeps nothing.

use crate::rules::Understanding;
use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;

/// Longer texts are not cached: they are rarely repeated word for word, and
/// leaving them out bounds the cache's memory by its size.
pub const MAX_CACHED_CHARS: usize = 200;

/// The cache key of a text: lowercase, runs of white space made one space,
/// trimmed. `None` for texts too long to cache.
pub fn key(text: &str) -> Option<String> {
    if text.chars().count() > MAX_CACHED_CHARS {
        return None;
    }
    Some(
        text.split_whitespace()
            .collect::<Vec<_>>()
            .join(" ")
            .to_lowercase(),
    )
}

pub struct TextCache {
    capacity: usize,
    entries: Mutex<Entries>,
}

#[derive(Default)]
struct Entries {
    /// Key → understanding and when it was last used.
    by_key: HashMap<String, (Understanding, u64)>,
    /// When last used → key; the first is the least recently used.
    by_use: BTreeMap<u64, String>,
    clock: u64,
}

impl Entries {
    fn touch(&mut self, key: &str, previous: u64) -> u64 {
        self.clock += 1;
        self.by_use.remove(&previous);
        self.by_use.insert(self.clock, key.to_string());
        self.clock
    }
}

impl TextCache {
    pub fn new(capacity: usize) -> Self {
        TextCache {
            capacity,
            entries: Mutex::new(Entries::default()),
        }
    }

    pub fn get(&self, key: &str) -> Option<Understanding> {
        let mut entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        let (understanding, used) = entries.by_key.get(key)?.clone();
        let now = entries.touch(key, used);
        if let Some(entry) = entries.by_key.get_mut(key) {
            entry.1 = now;
        }
        Some(understanding)
    }

    pub fn put(&self, key: String, understanding: Understanding) {
        if self.capacity == 0 {
            return;
        }
        let mut entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        let previous = entries.by_key.get(&key).map_or(0, |entry| entry.1);
        let now = entries.touch(&key, previous);
        entries.by_key.insert(key, (understanding, now));
        while entries.by_key.len() > self.capacity {
            let Some((_, oldest)) = entries.by_use.pop_first() else {
                break;
            };
            entries.by_key.remove(&oldest);
        }
    }

    pub fn len(&self) -> usize {
        self.entries
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .by_key
            .len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use botline_shared::message::Intent;

    fn understanding(name: &str) -> Understanding {
        Understanding {
            intent: Intent {
                name: name.into(),
                confidence: 1.0,
            },
            faq: None,
        }
    }

    fn name(cache: &TextCache, key: &str) -> Option<String> {
        cache.get(key).map(|u| u.intent.name)
    }

    #[test]
    fn keys_ignore_case_and_spacing_and_skip_long_texts() {
        assert_eq!(key("  Hello   World\n").as_deref(), Some("hello world"));
        assert_eq!(key("你好 ").as_deref(), Some("你好"));
        assert_eq!(
            key(&"好".repeat(MAX_CACHED_CHARS)).map(|k| k.len()),
            Some(600)
        );
        assert_eq!(key(&"x".repeat(MAX_CACHED_CHARS + 1)), None);
    }

    #[test]
    fn the_least_recently_used_goes_first() {
        let cache = TextCache::new(2);
        cache.put("a".into(), understanding("A"));
        cache.put("b".into(), understanding("B"));
        // Reading a makes b the least recently used.
        assert_eq!(name(&cache, "a").as_deref(), Some("A"));
        cache.put("c".into(), understanding("C"));
        assert_eq!(cache.len(), 2);
        assert_eq!(name(&cache, "b"), None);
        assert_eq!(name(&cache, "a").as_deref(), Some("A"));
        assert_eq!(name(&cache, "c").as_deref(), Some("C"));
        // Writing a key again replaces it and counts as a use.
        cache.put("c".into(), understanding("C2"));
        cache.put("d".into(), understanding("D"));
        assert_eq!(name(&cache, "a"), None);
        assert_eq!(name(&cache, "c").as_deref(), Some("C2"));
        assert_eq!(cache.len(), 2);
    }

    #[test]
    fn size_zero_keeps_nothing() {
        let cache = TextCache::new(0);
        cache.put("a".into(), understanding("A"));
        assert!(cache.is_empty());
        assert_eq!(name(&cache, "a"), None);
    }
}
