//! The counters of a running mount, as its stats file ([`crate::fuse::STATS_FILE`]) serves
//! them: one `name value` a line (see [`crate::fuse::stats_text`]). Parsed into [`Stats`],
//! which serializes to the JSON of `lorafs stats --json`: the same names, integers as
//! numbers, `kernel` a string.

use std::collections::BTreeMap;
use std::fmt;

use serde::Serialize;

/// One reading of a mount's counters. Field names are the stats file's, and the JSON keys
/// of `lorafs stats --json`: renaming one breaks its readers (the Python API).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Stats {
    /// Merged-block cache lookups that found the block.
    pub cache_hits: u64,
    /// Lookups that computed the block.
    pub cache_misses: u64,
    /// Lookups that found the block being computed by another reader and waited for it.
    pub cache_waits: u64,
    pub cache_evictions: u64,
    /// Bytes of merged blocks cached now, and the budget (`--cache-size`).
    pub cache_bytes: u64,
    pub cache_budget: u64,
    /// Bytes of merged blocks computed (misses).
    pub bytes_computed: u64,
    /// Bytes served to readers, by kind: merged, copied from the base, served from an
    /// adapter (replaced tensors), converted to `--dtype`.
    pub bytes_read: u64,
    pub bytes_merged: u64,
    pub bytes_passthrough: u64,
    pub bytes_replaced: u64,
    pub bytes_converted: u64,
    /// Bytes of factors held now, and their budget.
    pub factor_bytes: u64,
    pub factor_budget: u64,
    /// Tensors whose factors were read from the adapter files.
    pub factors_loaded: u64,
    /// Memory held now by base bytes read ahead of readers (staged or being read: their
    /// buffers' capacity), and its budget.
    pub read_ahead_bytes: u64,
    pub read_ahead_budget: u64,
    /// Base bytes read ahead, and of them taken by readers; ranges dropped unread.
    pub read_ahead_staged: u64,
    pub read_ahead_served: u64,
    pub read_ahead_dropped: u64,
    /// The merge kernel in use.
    pub kernel: String,
    /// The server's process id.
    pub pid: u64,
    /// Panics caught in request handlers (each cost one request an EIO).
    pub panics_caught: u64,
    /// Lines of a newer server this version does not know, kept as they were: integers as
    /// numbers, anything else as strings.
    #[serde(flatten)]
    pub other: BTreeMap<String, OtherValue>,
}

/// The value of a line [`Stats`] has no field for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(untagged)]
pub enum OtherValue {
    Integer(u64),
    Text(String),
}

impl fmt::Display for OtherValue {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        match self {
            OtherValue::Integer(n) => write!(f, "{n}"),
            OtherValue::Text(s) => f.write_str(s),
        }
    }
}

/// Why a text is not a mount's counters.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    #[error("line {line}: expected `name value`, found {text:?}")]
    Malformed { line: usize, text: String },
    #[error("line {line}: {name} is not an integer: {value:?}")]
    NotAnInteger {
        line: usize,
        name: String,
        value: String,
    },
    #[error("no {0} line")]
    Missing(&'static str),
}

/// Integer lines, in the order the stats file writes them, with their fields.
macro_rules! integer_fields {
    ($m:ident) => {
        $m!(
            cache_hits,
            cache_misses,
            cache_waits,
            cache_evictions,
            cache_bytes,
            cache_budget,
            bytes_computed,
            bytes_read,
            bytes_merged,
            bytes_passthrough,
            bytes_replaced,
            bytes_converted,
            factor_bytes,
            factor_budget,
            factors_loaded,
            read_ahead_bytes,
            read_ahead_budget,
            read_ahead_staged,
            read_ahead_served,
            read_ahead_dropped
        )
    };
}

impl Stats {
    /// Parse the stats file's text. Every known counter must be there (a text without them
    /// is not a mount's counters: e.g. a base file of that name served instead); lines of
    /// unknown names are kept in [`Stats::other`].
    pub fn parse(text: &str) -> Result<Stats, ParseError> {
        let mut lines = Lines::new();
        for (i, line) in text.lines().enumerate() {
            let malformed = || ParseError::Malformed {
                line: i + 1,
                text: line.chars().take(80).collect(),
            };
            let (name, value) = line.split_once(' ').ok_or_else(malformed)?;
            let name_ok = !name.is_empty()
                && (name.bytes())
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
            if !name_ok || value.is_empty() || lines.insert(name, (i + 1, value)).is_some() {
                return Err(malformed());
            }
        }
        let kernel = lines
            .remove("kernel")
            .ok_or(ParseError::Missing("kernel"))?
            .1;
        macro_rules! build {
            ($($field:ident),*) => {
                Stats {
                    $( $field: take_int(&mut lines, stringify!($field))?, )*
                    kernel: kernel.to_string(),
                    pid: take_int(&mut lines, "pid")?,
                    panics_caught: take_int(&mut lines, "panics_caught")?,
                    other: others(lines),
                }
            };
        }
        Ok(integer_fields!(build))
    }

    /// Block lookups that did not compute: hits, and waits for a block another reader was
    /// computing.
    pub fn lookups_served(&self) -> u64 {
        self.cache_hits.saturating_add(self.cache_waits)
    }

    /// Every block lookup.
    pub fn lookups(&self) -> u64 {
        self.lookups_served().saturating_add(self.cache_misses)
    }

    /// The share of lookups served without computing since the mount started; `None`
    /// before the first lookup.
    pub fn hit_rate(&self) -> Option<f64> {
        ratio(self.lookups_served(), self.lookups())
    }
}

/// The lines of the stats text by name: (line number, value).
type Lines<'a> = BTreeMap<&'a str, (usize, &'a str)>;

/// Remove line `name` and parse its value as an integer.
fn take_int(lines: &mut Lines, name: &'static str) -> Result<u64, ParseError> {
    let (line, value) = lines.remove(name).ok_or(ParseError::Missing(name))?;
    value.parse().map_err(|_| ParseError::NotAnInteger {
        line,
        name: name.to_string(),
        value: value.chars().take(80).collect(),
    })
}

/// The lines left once the known ones are taken.
fn others(lines: Lines) -> BTreeMap<String, OtherValue> {
    lines
        .into_iter()
        .map(|(name, (_, value))| {
            let value = match value.parse() {
                Ok(n) => OtherValue::Integer(n),
                Err(_) => OtherValue::Text(value.to_string()),
            };
            (name.to_string(), value)
        })
        .collect()
}

/// `part / whole`, `None` when `whole` is 0.
pub fn ratio(part: u64, whole: u64) -> Option<f64> {
    (whole > 0).then(|| part as f64 / whole as f64)
}

/// The text the stats file serves, in its order: `stats_text` of a server and this agree
/// (a test checks it), so a reading round-trips.
impl fmt::Display for Stats {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        macro_rules! lines {
            ($($field:ident),*) => { $( writeln!(f, "{} {}", stringify!($field), self.$field)?; )* };
        }
        integer_fields!(lines);
        writeln!(f, "kernel {}", self.kernel)?;
        writeln!(f, "pid {}", self.pid)?;
        writeln!(f, "panics_caught {}", self.panics_caught)?;
        for (name, value) in &self.other {
            writeln!(f, "{name} {value}")?;
        }
        Ok(())
    }
}

/// What changed between two readings of one mount, `secs` apart: the rates `--watch`
/// shows. Counters that went down (a different server at the same path) give 0.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Rates {
    pub interval_secs: f64,
    pub bytes_read_per_sec: f64,
    pub bytes_merged_per_sec: f64,
    pub bytes_computed_per_sec: f64,
    /// The share of the interval's block lookups served without computing; `None` (JSON
    /// null) when there were none.
    pub hit_rate: Option<f64>,
}

impl Rates {
    pub fn between(before: &Stats, after: &Stats, secs: f64) -> Rates {
        let per_sec = |a: u64, b: u64| {
            if secs > 0.0 {
                b.saturating_sub(a) as f64 / secs
            } else {
                0.0
            }
        };
        let lookups = after.lookups().saturating_sub(before.lookups());
        let served = (after.lookups_served()).saturating_sub(before.lookups_served());
        Rates {
            interval_secs: secs,
            bytes_read_per_sec: per_sec(before.bytes_read, after.bytes_read),
            bytes_merged_per_sec: per_sec(before.bytes_merged, after.bytes_merged),
            bytes_computed_per_sec: per_sec(before.bytes_computed, after.bytes_computed),
            hit_rate: ratio(served, lookups),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = "cache_hits 5\ncache_misses 3\ncache_waits 2\ncache_evictions 0\n\
        cache_bytes 1024\ncache_budget 268435456\nbytes_computed 4096\nbytes_read 8192\n\
        bytes_merged 4096\nbytes_passthrough 4096\nbytes_replaced 0\nbytes_converted 0\n\
        factor_bytes 100\nfactor_budget 200\nfactors_loaded 7\n\
        read_ahead_bytes 0\nread_ahead_budget 67108864\nread_ahead_staged 0\nread_ahead_served 0\n\
        read_ahead_dropped 0\nkernel avx2\npid 42\n\
        panics_caught 0\n";

    #[test]
    fn parses_and_prints_back_the_same_text() {
        let stats = Stats::parse(TEXT).unwrap();
        assert_eq!(stats.cache_hits, 5);
        assert_eq!(stats.kernel, "avx2");
        assert_eq!(stats.pid, 42);
        assert_eq!(stats.to_string(), TEXT);
        assert_eq!(stats.hit_rate(), Some(0.7));
    }

    #[test]
    fn json_keys_are_the_counter_names_integers_as_numbers() {
        let json = serde_json::to_value(Stats::parse(TEXT).unwrap()).unwrap();
        let object = json.as_object().unwrap();
        for line in TEXT.lines() {
            let (name, value) = line.split_once(' ').unwrap();
            let expected = match value.parse::<u64>() {
                Ok(n) => serde_json::json!(n),
                Err(_) => serde_json::json!(value),
            };
            assert_eq!(object[name], expected, "{name}");
        }
        assert_eq!(object.len(), TEXT.lines().count());
    }

    #[test]
    fn unknown_lines_are_kept_and_missing_ones_refused() {
        let stats = Stats::parse(&format!("{TEXT}new_counter 9\nmode fast\n")).unwrap();
        assert_eq!(stats.other["new_counter"], OtherValue::Integer(9));
        assert_eq!(stats.other["mode"], OtherValue::Text("fast".into()));
        let json = serde_json::to_value(&stats).unwrap();
        assert_eq!(json["new_counter"], 9);
        let without = TEXT.replace("cache_waits 2\n", "");
        assert_eq!(
            Stats::parse(&without),
            Err(ParseError::Missing("cache_waits"))
        );
        assert!(matches!(
            Stats::parse("the model's own file\n"),
            Err(ParseError::Missing(_))
        ));
        assert!(matches!(
            Stats::parse("{\"json\": 1}\n"),
            Err(ParseError::Malformed { line: 1, .. })
        ));
        assert!(matches!(
            Stats::parse(&TEXT.replace("pid 42", "pid x")),
            Err(ParseError::NotAnInteger { .. })
        ));
        assert!(
            Stats::parse(&format!("{TEXT}pid 43\n")).is_err(),
            "a repeated line"
        );
    }

    #[test]
    fn rates_over_an_interval() {
        let before = Stats::parse(TEXT).unwrap();
        let mut after = before.clone();
        after.bytes_read += 2000;
        after.bytes_merged += 1000;
        after.bytes_computed += 500;
        after.cache_hits += 3;
        after.cache_misses += 1;
        let rates = Rates::between(&before, &after, 2.0);
        assert_eq!(rates.bytes_read_per_sec, 1000.0);
        assert_eq!(rates.bytes_merged_per_sec, 500.0);
        assert_eq!(rates.bytes_computed_per_sec, 250.0);
        assert_eq!(rates.hit_rate, Some(0.75));
        assert_eq!(Rates::between(&after, &after, 1.0).hit_rate, None);
        assert_eq!(Rates::between(&after, &before, 1.0).bytes_read_per_sec, 0.0);
    }
}
