//! `botline trim`: the runner's trimming rule ([`lease::trim_stream`]) on
//! every pipeline stream of every partition at once (one line per key):
//! `XTRIM MINID ~` below the oldest entry any
//! group still needs (not yet delivered, or delivered and pending), and
//! never within the retention window. Streams without a group (`delivered`,
//! `dead`: capped by length instead) are left alone.

use super::{Ops, OpsError};
use crate::lease;
use crate::redis_conn::id_order;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrimLine {
    /// Full key (`{botline:p3}:in`): each partition's stream is trimmed
    /// on its own.
    pub stream: String,
    /// Entries below `keep_from` (`None`: no group, left alone).
    pub below: Option<u64>,
    /// The first id kept: the lowest of the retention window's start and
    /// what each group still needs.
    pub keep_from: Option<String>,
    /// Entries removed (0 on a dry run). `XTRIM … ~` removes whole stream
    /// nodes only, so this can be less than `below`.
    pub removed: u64,
}

impl Ops {
    pub async fn trim(&self, retention_ms: u64, dry_run: bool) -> Result<Vec<TrimLine>, OpsError> {
        let mut lines = Vec::new();
        for key in self.pipeline_streams().await? {
            let stream = key.clone();
            let Some(keep_from) = lease::keep_from(&self.pool, &key, retention_ms).await? else {
                lines.push(TrimLine {
                    stream,
                    below: None,
                    keep_from: None,
                    removed: 0,
                });
                continue;
            };
            let mut below = 0;
            // `(0-0` is no valid end: a group that has read nothing needs everything.
            if id_order(&keep_from) > (0, 0) {
                self.scan(&key, "-", &format!("({keep_from}"), |_| {
                    below += 1;
                    true
                })
                .await?;
            }
            let removed = if dry_run || below == 0 {
                0
            } else {
                lease::trim_stream(&self.pool, &key, retention_ms).await?
            };
            lines.push(TrimLine {
                stream,
                below: Some(below),
                keep_from: Some(keep_from),
                removed,
            });
        }
        Ok(lines)
    }
}

/// A table of what `trim` did or would do.
pub fn trim_table(lines: &[TrimLine], dry_run: bool) -> String {
    let mut out = String::new();
    for line in lines {
        match (&line.below, &line.keep_from) {
            (Some(below), Some(keep_from)) if dry_run => out.push_str(&format!(
                "{}: would remove up to {below} entries (below {keep_from})\n",
                line.stream
            )),
            (Some(below), Some(keep_from)) => out.push_str(&format!(
                "{}: removed {} of {below} entries below {keep_from} (whole stream nodes only)\n",
                line.stream, line.removed
            )),
            _ => out.push_str(&format!("{}: no group, left alone\n", line.stream)),
        }
    }
    out
}
