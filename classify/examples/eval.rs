//! Accuracy, macro-F1 and speed of the embedding model in each mode on a
//! labeled set (`classify/eval/messages.tsv`: text, intent, lang). Run by
//! `scripts/eval`; the model is the one in `BOTLINE_MODEL_PATH` or
//! `models/e5-small`, the settings the shipped ones with `--config FILE`
//! laid over them. The exact-text cache is off: every message is judged.
//!
//! `--set all|calibration|test`: all messages, or the even (calibration) or
//! odd (test) data lines, so thresholds can be chosen on one half and
//! reported on the other. `--modes precise,fast,cascade`. `--sweep` prints
//! accuracy over a grid of the static and cascade thresholds instead.
//! `--errors` prints each message a mode gets wrong. The keyword rules
//! (`intent_model = "keywords"`) are scored first, for comparison. In
//! `cascade` mode the set is also judged as if a backlog stood behind every
//! batch (`behind`: `cascade_backlog_share`).

use botline_shared::config::Settings;
use classify::cascade::{Decider, Mode};
use classify::embedding::EmbeddingIntents;
use classify::model::ModelError;
use classify::rules::{IntentModel, Understanding};
use classify::{cascade_model, keyword_model, load_encoder, model_path_from_env, ClassifySettings};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Instant;

/// Messages per call when measuring throughput: the runner's default batch.
const BATCH: usize = 200;

struct Labeled {
    text: String,
    intent: String,
    lang: String,
}

struct Options {
    file: String,
    config: Option<String>,
    set: String,
    modes: Vec<Mode>,
    sweep: bool,
    errors: bool,
}

fn options() -> anyhow::Result<Options> {
    let mut options = Options {
        file: "classify/eval/messages.tsv".into(),
        config: None,
        set: "all".into(),
        modes: vec![Mode::Precise, Mode::Fast, Mode::Cascade],
        sweep: false,
        errors: false,
    };
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = || {
            args.next()
                .ok_or_else(|| anyhow::anyhow!("{arg} needs a value"))
        };
        match arg.as_str() {
            "--file" => options.file = value()?,
            "--config" => options.config = Some(value()?),
            "--set" => options.set = value()?,
            "--modes" => {
                options.modes = value()?
                    .split(',')
                    .map(|mode| toml::Value::String(mode.into()).try_into())
                    .collect::<Result<_, _>>()?
            }
            "--sweep" => options.sweep = true,
            "--errors" => options.errors = true,
            _ => anyhow::bail!("unknown option {arg}; see the top of classify/examples/eval.rs"),
        }
    }
    Ok(options)
}

fn labeled(options: &Options) -> anyhow::Result<Vec<Labeled>> {
    let text = std::fs::read_to_string(&options.file)?;
    let all = text
        .lines()
        .filter(|line| !line.starts_with('#') && !line.trim().is_empty())
        .map(|line| match line.split('\t').collect::<Vec<_>>()[..] {
            [text, intent, lang] => Ok(Labeled {
                text: text.into(),
                intent: intent.into(),
                lang: lang.into(),
            }),
            _ => Err(anyhow::anyhow!("not text<TAB>intent<TAB>lang: {line:?}")),
        })
        .collect::<Result<Vec<_>, _>>()?;
    let keep = |index: usize| match options.set.as_str() {
        "calibration" => index.is_multiple_of(2),
        "test" => !index.is_multiple_of(2),
        _ => true,
    };
    Ok(all
        .into_iter()
        .enumerate()
        .filter(|(index, _)| keep(*index))
        .map(|(_, labeled)| labeled)
        .collect())
}

/// Accuracy and macro-F1 (over the intents expected or guessed) of `guesses`.
fn scores(set: &[&Labeled], guesses: &[&str]) -> (f64, f64) {
    let right = set
        .iter()
        .zip(guesses)
        .filter(|(l, g)| l.intent == **g)
        .count();
    let intents: BTreeSet<&str> = set
        .iter()
        .map(|l| l.intent.as_str())
        .chain(guesses.iter().copied())
        .collect();
    let f1: f64 = intents
        .iter()
        .map(|&intent| {
            let (mut tp, mut fp, mut fn_) = (0, 0, 0);
            for (l, &g) in set.iter().zip(guesses) {
                match (l.intent == intent, g == intent) {
                    (true, true) => tp += 1,
                    (false, true) => fp += 1,
                    (true, false) => fn_ += 1,
                    _ => {}
                }
            }
            2.0 * tp as f64 / (2 * tp + fp + fn_).max(1) as f64
        })
        .sum::<f64>()
        / intents.len().max(1) as f64;
    (right as f64 / set.len().max(1) as f64, f1)
}

/// One line per language (and all together): accuracy and macro-F1.
fn report(mode: &str, set: &[Labeled], guesses: &[&str]) {
    let mut by_lang: BTreeMap<&str, (Vec<&Labeled>, Vec<&str>)> = BTreeMap::new();
    for (l, &g) in set.iter().zip(guesses) {
        for lang in [l.lang.as_str(), "all"] {
            let entry = by_lang.entry(lang).or_default();
            entry.0.push(l);
            entry.1.push(g);
        }
    }
    for (lang, (labeled, guessed)) in by_lang {
        let (accuracy, f1) = scores(&labeled, &guessed);
        println!(
            "{mode:8} {lang:6} {:4} messages  accuracy {:5.1}%  macro-F1 {:5.1}%",
            labeled.len(),
            accuracy * 100.0,
            f1 * 100.0
        );
    }
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

/// The whole set in runner-sized batches, repeated for at least three
/// seconds and three rounds: the last round's verdicts and the median
/// round's messages per second (the machine is shared and noisy).
fn timed(
    texts: &[&str],
    decide: impl Fn(&[&str]) -> Result<Vec<(Understanding, Decider)>, ModelError>,
) -> anyhow::Result<(Vec<(Understanding, Decider)>, f64)> {
    let started = Instant::now();
    let (mut decided, mut rates) = (Vec::new(), Vec::new());
    while rates.len() < 3 || started.elapsed().as_secs_f64() < 3.0 {
        let round = Instant::now();
        decided = texts
            .chunks(BATCH)
            .map(&decide)
            .collect::<Result<Vec<_>, _>>()?
            .concat();
        rates.push(texts.len() as f64 / round.elapsed().as_secs_f64());
    }
    rates.sort_by(f64::total_cmp);
    Ok((decided, percentile(&rates, 0.5)))
}

fn transformer_share(decided: &[(Understanding, Decider)]) -> f64 {
    let transformer = decided
        .iter()
        .filter(|(_, path)| *path == Decider::Transformer)
        .count();
    100.0 * transformer as f64 / decided.len().max(1) as f64
}

fn evaluate(
    settings: &ClassifySettings,
    mode: Mode,
    set: &[Labeled],
    errors: bool,
) -> anyhow::Result<()> {
    let settings = ClassifySettings {
        embedding_mode: mode,
        intent_cache_size: 0,
        ..settings.clone()
    };
    let started = Instant::now();
    let model = cascade_model(&settings, &model_path_from_env())?;
    eprintln!(
        "{mode:?}: ready in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    let texts: Vec<&str> = set.iter().map(|l| l.text.as_str()).collect();
    // `fast` is measured on one core, as its target is set; the others
    // use every core, as the stage does.
    let threads = if mode == Mode::Fast { 1 } else { 0 };
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()?;
    let (decided, throughput) = pool.install(|| timed(&texts, |batch| model.decide(batch)))?;
    let mut latencies = texts
        .iter()
        .map(|text| {
            let started = Instant::now();
            model
                .decide(&[text])
                .map(|_| started.elapsed().as_secs_f64() * 1000.0)
        })
        .collect::<Result<Vec<_>, _>>()?;
    latencies.sort_by(f64::total_cmp);
    let guesses: Vec<&str> = decided
        .iter()
        .map(|(u, _)| u.intent.name.as_str())
        .collect();
    let name = format!("{mode:?}").to_lowercase();
    report(&name, set, &guesses);
    println!(
        "{name:8} speed  {throughput:9.0} messages/s in batches of {BATCH}; one at a time p50 {:.3} ms, p99 {:.3} ms; transformer for {:.1}% of messages",
        percentile(&latencies, 0.5),
        percentile(&latencies, 0.99),
        transformer_share(&decided)
    );
    if mode == Mode::Cascade {
        // Every batch as if a backlog stood behind it (cascade_backlog_share).
        let (behind, throughput) = timed(&texts, |batch| model.decide_behind(batch))?;
        let guesses: Vec<&str> = behind.iter().map(|(u, _)| u.intent.name.as_str()).collect();
        report("behind", set, &guesses);
        println!(
            "behind   speed  {throughput:9.0} messages/s in batches of {BATCH} behind a backlog; transformer for {:.1}% of messages",
            transformer_share(&behind)
        );
    }
    if errors {
        for (l, (u, path)) in set.iter().zip(&decided) {
            if u.intent.name != l.intent {
                println!(
                    "  {name} wrong: {:?} expected {}, got {} {:.3} ({path:?})",
                    l.text, l.intent, u.intent.name, u.intent.confidence
                );
            }
        }
    }
    Ok(())
}

/// Accuracy on `set` over a grid of the static and cascade thresholds.
fn sweep(settings: &ClassifySettings, set: &[Labeled]) -> anyhow::Result<()> {
    let dir = model_path_from_env();
    let encoder = load_encoder(settings, &dir)?;
    let fast = classify::static_intents(settings, &dir, &encoder)?;
    let precise = classify::transformer_intents(settings, Arc::new(encoder))?;
    let texts: Vec<&str> = set.iter().map(|l| l.text.as_str()).collect();
    let closest = |intents: &EmbeddingIntents| -> anyhow::Result<Vec<(String, f32)>> {
        Ok(intents
            .embedder()
            .embed(&texts)?
            .iter()
            .map(|e| {
                intents
                    .closest(e)
                    .map(|(n, s)| (n.to_string(), s))
                    .unwrap_or_default()
            })
            .collect())
    };
    let accuracy = |guesses: &[&str]| scores(&set.iter().collect::<Vec<_>>(), guesses).0 * 100.0;
    let static_closest = closest(&fast)?;
    for threshold in [0.0f32, 0.1, 0.2, 0.25, 0.3, 0.35, 0.4, 0.45, 0.5] {
        let guesses: Vec<&str> = static_closest
            .iter()
            .map(|(n, s)| {
                if *s >= threshold {
                    n.as_str()
                } else {
                    "unknown"
                }
            })
            .collect();
        println!(
            "fast     static_unknown_threshold {threshold:.2}: accuracy {:.1}%",
            accuracy(&guesses)
        );
    }
    let fast = fast.verdicts(&texts)?;
    let precise = precise.verdicts(&texts)?;
    // Cosine similarities (centroid, nearest_example) or probabilities (linear).
    for min_score in [0.3f32, 0.35, 0.4, 0.45, 0.5, 0.6, 0.7, 0.8, 0.9] {
        for min_margin in [0.0f32, 0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.5] {
            let mut transformer = 0;
            let guesses: Vec<&str> = fast
                .iter()
                .zip(&precise)
                .map(|(f, p)| {
                    if f.score >= min_score && f.margin >= min_margin {
                        f.understanding.intent.name.as_str()
                    } else {
                        transformer += 1;
                        p.understanding.intent.name.as_str()
                    }
                })
                .collect();
            println!(
                "cascade  min_score {min_score:.2} min_margin {min_margin:.2}: accuracy {:.1}%, transformer for {:.1}%",
                accuracy(&guesses),
                100.0 * transformer as f64 / texts.len() as f64
            );
        }
    }
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let options = options()?;
    let overlay = options
        .config
        .as_deref()
        .map(std::fs::read_to_string)
        .transpose()?;
    let settings: ClassifySettings =
        Settings::from_overlay(overlay.as_deref())?.section("classify")?;
    let set = labeled(&options)?;
    println!(
        "{} messages ({} set of {}), model {}",
        set.len(),
        options.set,
        options.file,
        model_path_from_env().display()
    );
    if options.sweep {
        return sweep(&settings, &set);
    }
    // The keyword rules, for comparison.
    let keywords = keyword_model(&settings)?;
    let texts: Vec<&str> = set.iter().map(|l| l.text.as_str()).collect();
    let intents = keywords.classify(&texts);
    let guesses: Vec<&str> = intents.iter().map(|i| i.name.as_str()).collect();
    report("keywords", &set, &guesses);
    for mode in &options.modes {
        evaluate(&settings, *mode, &set, options.errors)?;
    }
    Ok(())
}
