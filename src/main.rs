//! The `lorafs` command line.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};

use lorafs::materialize::{materialize, MaterializeOptions};
use lorafs::{Engine, EngineOptions};

#[derive(Parser)]
#[command(
    name = "lorafs",
    version,
    about = "A base model plus LoRA adapters, served as the merged model"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Write the merged model directory to OUT.
    Materialize {
        #[command(flatten)]
        inputs: Inputs,
        /// Output directory (must not exist, unless --force).
        out: PathBuf,
        /// Replace OUT if it exists.
        #[arg(long)]
        force: bool,
    },
    /// Show the merge plan: adapters, scales, the tensors they change.
    Inspect {
        #[command(flatten)]
        inputs: Inputs,
        /// List every merged tensor.
        #[arg(long)]
        tensors: bool,
    },
}

#[derive(Args)]
struct Inputs {
    /// Base model directory (config.json, tokenizer, *.safetensors).
    base: PathBuf,
    /// LoRA adapter directory, optionally with a weight: DIR or DIR:WEIGHT. Repeat to merge
    /// several; their deltas are summed in f32 and rounded once.
    #[arg(long = "adapter", short = 'a', value_name = "DIR[:WEIGHT]", required = true, value_parser = parse_adapter)]
    adapters: Vec<(PathBuf, f64)>,
    /// Bytes of merged blocks to cache (e.g. 512MiB, 2GiB).
    #[arg(long, value_name = "SIZE", default_value = "256MiB", value_parser = parse_size)]
    cache_size: usize,
}

impl Inputs {
    fn open(&self) -> anyhow::Result<Engine> {
        let options = EngineOptions {
            cache_bytes: self.cache_size,
        };
        Ok(Engine::open(&self.base, &self.adapters, options)?)
    }

    fn paths(&self) -> Vec<&Path> {
        std::iter::once(self.base.as_path())
            .chain(self.adapters.iter().map(|(p, _)| p.as_path()))
            .collect()
    }
}

/// `DIR` or `DIR:WEIGHT`; a suffix that is not a number stays part of the path.
fn parse_adapter(arg: &str) -> Result<(PathBuf, f64), String> {
    if let Some((dir, weight)) = arg.rsplit_once(':') {
        if let Ok(w) = weight.parse::<f64>() {
            if !w.is_finite() {
                return Err(format!("adapter weight {weight} is not a finite number"));
            }
            return Ok((PathBuf::from(dir), w));
        }
    }
    Ok((PathBuf::from(arg), 1.0))
}

/// A byte count: a number with an optional unit (B, K/KB/KiB, M/MB/MiB, G/GB/GiB), all
/// binary multiples.
fn parse_size(arg: &str) -> Result<usize, String> {
    let arg = arg.trim();
    let split = arg
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(arg.len());
    let (number, unit) = arg.split_at(split);
    let number: f64 = number
        .parse()
        .map_err(|_| format!("{arg:?} is not a size like 512MiB"))?;
    let shift = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kb" | "kib" => 10,
        "m" | "mb" | "mib" => 20,
        "g" | "gb" | "gib" => 30,
        "t" | "tb" | "tib" => 40,
        other => {
            return Err(format!(
                "unknown size unit {other:?} (use B, KiB, MiB, GiB)"
            ))
        }
    };
    Ok((number * (1u64 << shift) as f64) as usize)
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Materialize { inputs, out, force } => {
            let engine = inputs.open()?;
            log::info!("kernel: {}", engine.kernel.name());
            let options = MaterializeOptions {
                force,
                progress: std::io::stderr().is_terminal(),
            };
            let summary = materialize(&engine, &out, &inputs.paths(), &options)
                .with_context(|| format!("materialize into {} failed", out.display()))?;
            println!("{}: {summary}", out.display());
        }
        Command::Inspect { inputs, tensors } => {
            let engine = inputs.open()?;
            print!("{}", lorafs::inspect::report(&engine, tensors));
        }
    }
    Ok(())
}

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::new().filter_or("LORAFS_LOG", "warn")).init();
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("lorafs: error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn adapter_arguments() {
        assert_eq!(parse_adapter("a/b").unwrap(), (PathBuf::from("a/b"), 1.0));
        assert_eq!(
            parse_adapter("a/b:0.5").unwrap(),
            (PathBuf::from("a/b"), 0.5)
        );
        assert_eq!(parse_adapter("c:/x").unwrap(), (PathBuf::from("c:/x"), 1.0));
        assert!(parse_adapter("a:inf").is_err());
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("0").unwrap(), 0);
        assert_eq!(parse_size("2GiB").unwrap(), 2 << 30);
        assert_eq!(parse_size("512m").unwrap(), 512 << 20);
        assert_eq!(parse_size("1.5K").unwrap(), 1536);
        assert!(parse_size("12 parsecs").is_err());
    }
}
