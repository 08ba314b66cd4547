//! Adapter arguments as users write them, shared by `--adapter` and the specs of
//! `lorafs view`: `DIR[:WEIGHT]`, where DIR may be a repo id in the local Hugging Face cache.

use std::path::{Path, PathBuf};

/// `DIR` or `DIR:WEIGHT`; a suffix that is not a number stays part of the path, and so does
/// one that is when the whole argument names an existing path (a directory `ad:2`).
pub fn parse_adapter(arg: &str) -> Result<(PathBuf, f64), String> {
    if Path::new(arg).exists() {
        return Ok((PathBuf::from(arg), 1.0));
    }
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

/// Adapter arguments with repo ids resolved to directories.
pub fn resolve_adapters(adapters: &[(PathBuf, f64)]) -> crate::Result<Vec<(PathBuf, f64)>> {
    adapters
        .iter()
        .map(|(arg, weight)| Ok((crate::hub::resolve(arg)?, *weight)))
        .collect()
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
    fn an_existing_path_wins_over_a_weight_suffix() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("ad:2");
        let arg = dir.to_str().unwrap();
        assert_eq!(
            parse_adapter(arg).unwrap(),
            (tmp.path().join("ad"), 2.0),
            "no such path yet: a weight"
        );
        std::fs::create_dir(&dir).unwrap();
        assert_eq!(parse_adapter(arg).unwrap(), (dir.clone(), 1.0));
        let weighted = format!("{arg}:0.5");
        assert_eq!(parse_adapter(&weighted).unwrap(), (dir, 0.5));
    }
}
