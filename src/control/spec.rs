//! View names and specs: what users may call a view, and how they list its adapters.

use std::path::{Path, PathBuf};

use crate::dtype::DType;
use crate::gguf::OutType;
use crate::plan::combine::Combine;

/// What a view merges and how: its adapters and weights, and the options a views file may
/// set per view. `None` options are the mount's (`--dtype`, `--gguf`).
#[derive(Debug, Clone, PartialEq)]
pub struct ViewSpec {
    /// Adapter directories (resolved) and their weights, in merge order.
    pub adapters: Vec<(PathBuf, f64)>,
    pub dtype: Option<DType>,
    pub gguf: Option<Vec<OutType>>,
    /// How the adapters are combined; `None`: the weighted sum of their deltas.
    pub combine: Option<Combine>,
}

impl ViewSpec {
    /// The view of `adapters` with the mount's options.
    pub fn of_adapters(adapters: Vec<(PathBuf, f64)>) -> ViewSpec {
        ViewSpec {
            adapters,
            dtype: None,
            gguf: None,
            combine: None,
        }
    }
}

/// Components in a view name at most: enough for `family/task/version` and then some.
const MAX_NAME_COMPONENTS: usize = 8;
/// Bytes per component at most: the usual NAME_MAX, as a view shows as a directory.
const MAX_COMPONENT_BYTES: usize = 255;

/// Check a view name: a relative path of 1 to 8 `/`-separated components, each 1 to 255
/// bytes of `[A-Za-z0-9._+-]` not starting with `.` (so no `.`, `..` or hidden names).
pub fn check_view_name(name: &str) -> Result<(), String> {
    let components: Vec<&str> = name.split('/').collect();
    if components.len() > MAX_NAME_COMPONENTS {
        return Err(format!(
            "view name {name:?} has {} components; at most {MAX_NAME_COMPONENTS}",
            components.len()
        ));
    }
    for component in components {
        let problem = if component.is_empty() {
            "an empty component (a leading, trailing or doubled /)"
        } else if component.starts_with('.') {
            "a component starting with '.'"
        } else if component.len() > MAX_COMPONENT_BYTES {
            "a component over 255 bytes"
        } else if !component
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._+-".contains(&b))
        {
            "a character other than A-Z a-z 0-9 . _ + - and the separator /"
        } else {
            continue;
        };
        return Err(format!("view name {name:?} has {problem}"));
    }
    Ok(())
}

/// `ADAPTER[:WEIGHT],...`: each part as `--adapter` takes it (`crate::args::parse_adapter`),
/// not yet resolved. A directory whose name holds a comma cannot be named here.
pub fn parse_spec(spec: &str) -> Result<Vec<(PathBuf, f64)>, String> {
    if spec.is_empty() {
        return Err("empty view spec: give ADAPTER[:WEIGHT], comma-separated".into());
    }
    spec.split(',')
        .map(|part| match part {
            "" => Err(format!(
                "view spec {spec:?} has an empty adapter (a leading, trailing or doubled comma)"
            )),
            part => crate::args::parse_adapter(part),
        })
        .collect()
}

/// `DIR:WEIGHT,...`, weights as Rust prints an f64 (`1`, `0.5`).
pub fn format_spec<'a>(adapters: impl IntoIterator<Item = (&'a Path, f64)>) -> String {
    adapters
        .into_iter()
        .map(|(dir, weight)| format!("{}:{weight}", dir.display()))
        .collect::<Vec<_>>()
        .join(",")
}

/// The server's check of a request's adapters: the command resolves them, so anything
/// but absolute paths and finite weights comes from another client.
pub(super) fn check_adapters(adapters: &[(PathBuf, f64)]) -> Result<(), String> {
    if adapters.is_empty() {
        return Err("a view needs at least one adapter".into());
    }
    for (dir, weight) in adapters {
        if !dir.is_absolute() {
            return Err(format!("adapter {} is not an absolute path", dir.display()));
        }
        if !weight.is_finite() {
            return Err(format!(
                "adapter {}: weight {weight} is not a finite number",
                dir.display()
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn view_names() {
        let long = "x".repeat(255);
        for good in [
            "a",
            "chat",
            "math/v2",
            "A.b_c+d-e",
            "1/2/3/4/5/6/7/8",
            &long,
        ] {
            assert_eq!(check_view_name(good), Ok(()), "{good:?}");
        }
        let too_long = "x".repeat(256);
        for bad in [
            "",
            "/abs",
            "a/",
            "a//b",
            ".",
            "..",
            "a/../b",
            ".hidden",
            "a/.b",
            "sp ace",
            "a\\b",
            "é",
            "a:b",
            "a,b",
            "1/2/3/4/5/6/7/8/9",
            &too_long,
        ] {
            assert!(check_view_name(bad).is_err(), "{bad:?} accepted");
        }
        let message = check_view_name("a/../b").unwrap_err();
        assert!(message.contains("starting with '.'"), "{message}");
    }

    #[test]
    fn specs() {
        assert_eq!(
            parse_spec("/no/such/a:1,/no/such/b:0.5,org/name").unwrap(),
            vec![
                (PathBuf::from("/no/such/a"), 1.0),
                (PathBuf::from("/no/such/b"), 0.5),
                (PathBuf::from("org/name"), 1.0),
            ]
        );
        assert!(parse_spec("").unwrap_err().contains("empty view spec"));
        for bad in [",a", "a,", "a,,b"] {
            assert!(
                parse_spec(bad).unwrap_err().contains("empty adapter"),
                "{bad:?}"
            );
        }
        assert!(parse_spec("a:NaN").unwrap_err().contains("finite"));
        assert!(parse_spec("a:1,b:-inf").unwrap_err().contains("finite"));
    }

    #[test]
    fn specs_print_as_they_parse() {
        let adapters = [
            (PathBuf::from("/l/one"), 1.0),
            (PathBuf::from("/l/two"), 0.5),
            (PathBuf::from("/l/three"), -2.0),
        ];
        let text = format_spec(adapters.iter().map(|(d, w)| (d.as_path(), *w)));
        assert_eq!(text, "/l/one:1,/l/two:0.5,/l/three:-2");
        assert_eq!(parse_spec(&text).unwrap(), adapters);
    }

    #[test]
    fn the_server_takes_absolute_dirs_and_finite_weights_only() {
        assert!(check_adapters(&[]).is_err());
        assert!(check_adapters(&[(PathBuf::from("rel"), 1.0)]).is_err());
        assert!(check_adapters(&[(PathBuf::from("/a"), f64::NAN)]).is_err());
        assert_eq!(check_adapters(&[(PathBuf::from("/a"), 0.0)]), Ok(()));
    }
}
