//! A mutation fuzzer on the stable toolchain for the inputs a peer or a file
//! controls (wire frames, `worker.toml`, `master.toml`, schedule syntax, the
//! control plane's requests): seeds of valid inputs, structure-aware
//! mutations, a fixed seed by default, and every failing input printed so it
//! can become a regression case.
//!
//! Each target is a test (`cargo test fuzz_`) that runs a short seeded pass;
//! `NIGHTSHIFT_FUZZ_ITERS=2000000 cargo test --release fuzz_ -- --nocapture`
//! runs a long one, `NIGHTSHIFT_FUZZ_ITERS_<TARGET>` (the target's name in
//! capitals, `-` and `.` as `_`: `NIGHTSHIFT_FUZZ_ITERS_SCHEDULE`) gives one
//! target its own count, `NIGHTSHIFT_FUZZ_SEED` picks other dice. A pass
//! prints its progress every tenth of its count or every 30 s.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// Seed used when `NIGHTSHIFT_FUZZ_SEED` is unset: runs are reproducible.
pub const DEFAULT_SEED: u64 = 20_261_130;

/// Largest input the mutator grows: long enough for deep nesting and long
/// values, short enough that a pass stays fast (size limits have their own tests).
const MAX_INPUT_BYTES: usize = 8 * 1024;

/// Tokens that matter to every grammar we parse (TOML, JSON, cron, hours,
/// durations); each target adds its own.
const COMMON_TOKENS: &[&str] = &[
    "\"",
    "'",
    "\\",
    "{",
    "}",
    "[",
    "]",
    "[[",
    "]]",
    "=",
    ",",
    ":",
    ";",
    "-",
    "+",
    "*",
    "/",
    "#",
    "\n",
    "\r\n",
    "\t",
    " ",
    "\0",
    "0",
    "-1",
    "1e309",
    "59",
    "60",
    "24",
    "23:59",
    "24:00",
    "4294967296",
    "18446744073709551616",
    "9223372036854775807",
    "-9223372036854775808",
    "null",
    "true",
    "false",
    "\u{feff}",
    "\u{202e}",
    "é",
    "\u{10ffff}",
    "\"\"\"",
    "'''",
    "%",
    "..",
    "~",
];

/// The longest a pass runs without printing its progress.
const PROGRESS_EVERY: Duration = Duration::from_secs(30);

/// Values from the environment that shape a run.
#[derive(Clone, Copy, Debug)]
pub struct FuzzSettings {
    pub iterations: u64,
    pub seed: u64,
}

impl FuzzSettings {
    /// For `target`: `NIGHTSHIFT_FUZZ_ITERS_<TARGET>` (see
    /// [`iterations_variable`]), else `NIGHTSHIFT_FUZZ_ITERS`, else
    /// `default_iterations`; and `NIGHTSHIFT_FUZZ_SEED` (else
    /// [`DEFAULT_SEED`]).
    pub fn from_env(target: &str, default_iterations: u64) -> FuzzSettings {
        Self::from_lookup(target, default_iterations, |name| std::env::var(name).ok())
    }

    /// [`FuzzSettings::from_env`] reading variables through `lookup`.
    fn from_lookup(
        target: &str,
        default_iterations: u64,
        lookup: impl Fn(&str) -> Option<String>,
    ) -> FuzzSettings {
        let number = |name: &str| {
            lookup(name).map(|text| {
                text.trim()
                    .replace('_', "")
                    .parse::<u64>()
                    .unwrap_or_else(|_| panic!("{name}={text:?} is not a whole number"))
            })
        };
        FuzzSettings {
            iterations: number(&iterations_variable(target))
                .or_else(|| number("NIGHTSHIFT_FUZZ_ITERS"))
                .unwrap_or(default_iterations),
            seed: number("NIGHTSHIFT_FUZZ_SEED").unwrap_or(DEFAULT_SEED),
        }
    }
}

/// The variable that sets `target`'s own count: `NIGHTSHIFT_FUZZ_ITERS_`
/// and the name in capitals, each other character than a letter or digit
/// as `_` (`master.toml` → `NIGHTSHIFT_FUZZ_ITERS_MASTER_TOML`).
pub fn iterations_variable(target: &str) -> String {
    crate::env::variable_name("NIGHTSHIFT_FUZZ_ITERS_", target)
}

/// Prints a pass's progress every tenth of its count or every
/// [`PROGRESS_EVERY`], whichever comes first.
struct Progress {
    started: Instant,
    last_printed: Instant,
    tenth: u64,
    next_count: u64,
}

impl Progress {
    fn new(iterations: u64) -> Progress {
        let tenth = (iterations / 10).max(1);
        let now = Instant::now();
        Progress {
            started: now,
            last_printed: now,
            tenth,
            next_count: tenth,
        }
    }

    /// Called after each input; cheap unless a line is due.
    fn tick(&mut self, target: &str, inputs: u64, iterations: u64, accepted: u64) {
        let by_count = inputs >= self.next_count;
        if !by_count
            && (!inputs.is_multiple_of(256) || self.last_printed.elapsed() < PROGRESS_EVERY)
        {
            return;
        }
        if by_count {
            self.next_count = (inputs / self.tenth + 1) * self.tenth;
        }
        self.last_printed = Instant::now();
        let seconds = self.started.elapsed().as_secs_f64();
        eprintln!(
            "fuzz {target}: {inputs} of {iterations} inputs ({:.0} %), {accepted} accepted, {seconds:.1} s ({:.0}/s)",
            inputs as f64 * 100.0 / iterations.max(1) as f64,
            inputs as f64 / seconds.max(1e-9)
        );
    }
}

/// What a finished pass saw.
#[derive(Clone, Debug)]
pub struct FuzzReport {
    pub target: String,
    pub inputs: u64,
    /// Inputs the target accepted (parsed, decoded, answered 2xx …), to show
    /// that the mutations reach past the first error.
    pub accepted: u64,
    pub seconds: f64,
}

impl std::fmt::Display for FuzzReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "fuzz {}: {} inputs ({} accepted), 0 panics, 0 violations, {:.1} s ({:.0}/s)",
            self.target,
            self.inputs,
            self.accepted,
            self.seconds,
            self.inputs as f64 / self.seconds.max(1e-9)
        )
    }
}

/// What one input did to the target.
pub enum Verdict {
    /// The target took the input (and its properties held).
    Accepted,
    /// The target refused it cleanly.
    Refused,
    /// A property the target promises was broken.
    Violation(String),
}

/// Runs `check` on the seeds and then on mutated inputs; panics naming the
/// input that panicked `check` or broke a property.
pub fn run(
    target: &str,
    seeds: &[String],
    tokens: &[&str],
    default_iterations: u64,
    mut check: impl FnMut(&str) -> Verdict,
) -> FuzzReport {
    assert!(!seeds.is_empty(), "fuzz target {target} has no seeds");
    let settings = FuzzSettings::from_env(target, default_iterations);
    let mut mutator = Mutator::new(settings.seed, seeds, tokens);
    let started = Instant::now();
    let mut progress = Progress::new(settings.iterations);
    let mut accepted = 0;
    let mut inputs = 0;
    let mut try_one = |input: &str, inputs: &mut u64, accepted: &mut u64| {
        *inputs += 1;
        match catch_unwind(AssertUnwindSafe(|| check(input))) {
            Ok(Verdict::Accepted) => {
                *accepted += 1;
                true
            }
            Ok(Verdict::Refused) => false,
            Ok(Verdict::Violation(what)) => fail(target, settings, input, &what),
            Err(panic) => {
                let what = panic
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| panic.downcast_ref::<&str>().map(|s| (*s).to_owned()))
                    .unwrap_or_else(|| "a panic".into());
                fail(target, settings, input, &format!("panicked: {what}"))
            }
        }
    };
    for seed in seeds {
        try_one(seed, &mut inputs, &mut accepted);
    }
    while inputs < settings.iterations {
        let input = mutator.next_input();
        if try_one(&input, &mut inputs, &mut accepted) {
            mutator.keep(input);
        }
        progress.tick(target, inputs, settings.iterations, accepted);
    }
    let report = FuzzReport {
        target: target.to_owned(),
        inputs,
        accepted,
        seconds: started.elapsed().as_secs_f64(),
    };
    eprintln!("{report}");
    report
}

fn fail(target: &str, settings: FuzzSettings, input: &str, what: &str) -> ! {
    panic!(
        "fuzz {target} (NIGHTSHIFT_FUZZ_SEED={}): {what}\ninput ({} bytes): {input:?}",
        settings.seed,
        input.len()
    )
}

/// Structure-aware mutations of UTF-8 text: byte edits, grammar tokens,
/// splices between inputs, line swaps and duplications.
pub struct Mutator {
    rng: StdRng,
    pool: Vec<String>,
    tokens: Vec<String>,
}

/// Inputs kept to mutate further; accepted inputs replace old ones past this.
const POOL_LIMIT: usize = 256;

impl Mutator {
    pub fn new(seed: u64, seeds: &[String], tokens: &[&str]) -> Mutator {
        let tokens = tokens
            .iter()
            .chain(COMMON_TOKENS)
            .map(|token| (*token).to_owned())
            .collect();
        Mutator {
            rng: StdRng::seed_from_u64(seed),
            pool: seeds.to_vec(),
            tokens,
        }
    }

    /// Remembers an input the target accepted, so later mutations start
    /// from deeper inside the grammar.
    pub fn keep(&mut self, input: String) {
        if self.pool.len() < POOL_LIMIT {
            self.pool.push(input);
        } else {
            let slot = self.rng.random_range(0..self.pool.len());
            self.pool[slot] = input;
        }
    }

    /// A new input: one to four mutations of an input from the pool.
    pub fn next_input(&mut self) -> String {
        let base = &self.pool[self.rng.random_range(0..self.pool.len())];
        let mut bytes = base.clone().into_bytes();
        for _ in 0..self.rng.random_range(1..=4) {
            self.mutate(&mut bytes);
        }
        bytes.truncate(MAX_INPUT_BYTES);
        let mut text = match String::from_utf8(bytes) {
            Ok(text) => text,
            Err(error) => String::from_utf8_lossy(error.as_bytes()).into_owned(),
        };
        if text.len() > MAX_INPUT_BYTES {
            let mut end = MAX_INPUT_BYTES;
            while !text.is_char_boundary(end) {
                end -= 1;
            }
            text.truncate(end);
        }
        text
    }

    fn mutate(&mut self, bytes: &mut Vec<u8>) {
        let len = bytes.len();
        let at = |rng: &mut StdRng| rng.random_range(0..=len);
        match self.rng.random_range(0..10) {
            // Flip, set or delete single bytes.
            0 if len > 0 => {
                let i = self.rng.random_range(0..len);
                bytes[i] ^= 1 << self.rng.random_range(0..8);
            }
            1 if len > 0 => {
                let i = self.rng.random_range(0..len);
                bytes[i] = self.rng.random();
            }
            2 if len > 0 => {
                let start = self.rng.random_range(0..len);
                let end = (start + self.rng.random_range(1..=16)).min(len);
                bytes.drain(start..end);
            }
            // Insert a token of the grammar.
            3 | 4 => {
                let token = &self.tokens[self.rng.random_range(0..self.tokens.len())];
                let i = at(&mut self.rng);
                bytes.splice(i..i, token.bytes());
            }
            // Replace a run of digits or letters by a token (numbers and names
            // in the wrong place are where parsers go wrong).
            5 if len > 0 => {
                let i = self.rng.random_range(0..len);
                let class = |b: u8| b.is_ascii_alphanumeric();
                if class(bytes[i]) {
                    let mut start = i;
                    while start > 0 && class(bytes[start - 1]) {
                        start -= 1;
                    }
                    let mut end = i;
                    while end < len && class(bytes[end]) {
                        end += 1;
                    }
                    let token = &self.tokens[self.rng.random_range(0..self.tokens.len())];
                    bytes.splice(start..end, token.bytes());
                }
            }
            // Splice in a piece of another input.
            6 => {
                let other = &self.pool[self.rng.random_range(0..self.pool.len())];
                if !other.is_empty() {
                    let start = self.rng.random_range(0..other.len());
                    let end = (start + self.rng.random_range(1..=64)).min(other.len());
                    let i = at(&mut self.rng);
                    bytes.splice(i..i, other.as_bytes()[start..end].iter().copied());
                }
            }
            // Duplicate or drop a whole line, or swap two lines.
            7 | 8 => {
                let text = String::from_utf8_lossy(bytes).into_owned();
                let mut lines: Vec<&str> = text.split('\n').collect();
                if lines.len() > 1 {
                    let a = self.rng.random_range(0..lines.len());
                    let b = self.rng.random_range(0..lines.len());
                    match self.rng.random_range(0..3) {
                        0 => lines.insert(b, lines[a]),
                        1 => {
                            lines.remove(a);
                        }
                        _ => lines.swap(a, b),
                    }
                    *bytes = lines.join("\n").into_bytes();
                }
            }
            // Repeat a piece many times (deep nesting, long values).
            _ if len > 0 => {
                let start = self.rng.random_range(0..len);
                let end = (start + self.rng.random_range(1..=8)).min(len);
                let piece = bytes[start..end].to_vec();
                let times = self.rng.random_range(2..=64);
                let i = at(&mut self.rng);
                let repeated: Vec<u8> = piece
                    .iter()
                    .copied()
                    .cycle()
                    .take(piece.len() * times)
                    .collect();
                bytes.splice(i..i, repeated);
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_same_seed_gives_the_same_inputs() {
        let seeds = vec!["hours = \"19:00-07:00\"".to_owned()];
        let mut a = Mutator::new(7, &seeds, &["mon"]);
        let mut b = Mutator::new(7, &seeds, &["mon"]);
        for _ in 0..1000 {
            assert_eq!(a.next_input(), b.next_input());
        }
    }

    #[test]
    fn inputs_stay_within_the_size_bound() {
        let seeds = vec!["x".repeat(MAX_INPUT_BYTES)];
        let mut mutator = Mutator::new(1, &seeds, &[]);
        for _ in 0..200 {
            assert!(mutator.next_input().len() <= MAX_INPUT_BYTES);
        }
    }

    #[test]
    fn a_target_count_beats_the_common_count() {
        let env = |pairs: &'static [(&'static str, &'static str)]| {
            move |name: &str| {
                pairs
                    .iter()
                    .find(|(key, _)| *key == name)
                    .map(|(_, value)| (*value).to_owned())
            }
        };
        assert_eq!(
            iterations_variable("master.toml"),
            "NIGHTSHIFT_FUZZ_ITERS_MASTER_TOML"
        );
        assert_eq!(
            iterations_variable("wire-agent"),
            "NIGHTSHIFT_FUZZ_ITERS_WIRE_AGENT"
        );
        let both = env(&[
            ("NIGHTSHIFT_FUZZ_ITERS", "2_000_000"),
            ("NIGHTSHIFT_FUZZ_ITERS_SCHEDULE", "300000"),
        ]);
        assert_eq!(
            FuzzSettings::from_lookup("schedule", 5, both).iterations,
            300_000
        );
        assert_eq!(
            FuzzSettings::from_lookup("durations", 5, both).iterations,
            2_000_000
        );
        let none = env(&[]);
        let settings = FuzzSettings::from_lookup("schedule", 5, none);
        assert_eq!((settings.iterations, settings.seed), (5, DEFAULT_SEED));
    }

    #[test]
    #[should_panic(expected = "panicked: boom")]
    fn a_panicking_target_names_the_input() {
        run("boom", &["a".to_owned()], &[], 10, |input| {
            if input == "a" {
                panic!("boom")
            }
            Verdict::Refused
        });
    }
}
