//! How several adapters are combined into one delta: PEFT's `add_weighted_adapter`
//! `combination_type`s, as lorafs names and checks them. Without a [`Combine`], adapters
//! are merged as `--adapter DIR:W` always did: `W + Σ wᵢ·sᵢ·Bᵢ@Aᵢ`, each delta exact.

use std::fmt;
use std::str::FromStr;

/// A PEFT `combination_type` lorafs computes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Method {
    /// The factors concatenated along the rank: the weighted sum of deltas.
    Cat,
    /// `A = Σ sign(wᵢsᵢ)·√|wᵢsᵢ|·Aᵢ`, `B = Σ √|wᵢsᵢ|·Bᵢ`, merged with scale 1 (cross terms).
    Linear,
    /// Linear with magnitude pruning of each factor, sign election and disjoint mean.
    Ties,
    /// Linear with random pruning of each factor, rescaled by `1/density`.
    DareLinear,
    /// Ties with DARE's random pruning in place of magnitude pruning.
    DareTies,
    /// Linear with magnitude pruning of each factor.
    MagnitudePrune,
    /// The weighted sum of deltas truncated to `svd_rank` by SVD.
    Svd,
}

/// PEFT's `majority_sign_method` for sign election (ties, dare_ties).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum MajoritySign {
    /// The sign of the sum of the values.
    #[default]
    Total,
    /// The sign held by more values.
    Frequency,
}

/// A combination method with its parameters, as `--combine` and a views file give it.
#[derive(Debug, Clone, PartialEq)]
pub struct Combine {
    pub method: Method,
    /// The fraction of each factor's values kept (ties, dare_*, magnitude_prune).
    pub density: Option<f64>,
    pub majority_sign: MajoritySign,
    /// The rank `svd` truncates to; `None`: the largest rank among the adapters (PEFT's
    /// default).
    pub svd_rank: Option<usize>,
    /// Seeds DARE's random masks: the same seed gives the same bytes.
    pub seed: u64,
}

/// PEFT's names of the variants that prune the dense delta before its SVD.
const DENSE_SVD: [&str; 4] = [
    "ties_svd",
    "dare_linear_svd",
    "dare_ties_svd",
    "magnitude_prune_svd",
];

impl Method {
    pub const ALL: [Method; 7] = [
        Method::Cat,
        Method::Linear,
        Method::Ties,
        Method::DareLinear,
        Method::DareTies,
        Method::MagnitudePrune,
        Method::Svd,
    ];

    /// PEFT's name of the method.
    pub fn name(self) -> &'static str {
        match self {
            Method::Cat => "cat",
            Method::Linear => "linear",
            Method::Ties => "ties",
            Method::DareLinear => "dare_linear",
            Method::DareTies => "dare_ties",
            Method::MagnitudePrune => "magnitude_prune",
            Method::Svd => "svd",
        }
    }

    /// Whether the method prunes each factor and so needs a density.
    pub fn prunes(self) -> bool {
        matches!(
            self,
            Method::Ties | Method::DareLinear | Method::DareTies | Method::MagnitudePrune
        )
    }

    /// Whether the method draws random masks.
    pub fn is_random(self) -> bool {
        matches!(self, Method::DareLinear | Method::DareTies)
    }

    /// Whether the method elects a sign per value.
    pub fn elects_sign(self) -> bool {
        matches!(self, Method::Ties | Method::DareTies)
    }
}

impl fmt::Display for Method {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Method {
    type Err = String;

    fn from_str(name: &str) -> Result<Method, String> {
        if let Some(method) = Method::ALL.into_iter().find(|m| m.name() == name) {
            return Ok(method);
        }
        if DENSE_SVD.contains(&name) {
            return Err(format!(
                "combination {name:?} is not supported: it prunes the dense delta of every \
                 tensor before its SVD, a full-size matrix per layer; use \"svd\" (exact, \
                 from the factors), or the pruning method without _svd"
            ));
        }
        let names: Vec<&str> = Method::ALL.iter().map(|m| m.name()).collect();
        Err(format!(
            "unknown combination {name:?}: expected one of {}",
            names.join(", ")
        ))
    }
}

impl FromStr for MajoritySign {
    type Err = String;

    fn from_str(name: &str) -> Result<MajoritySign, String> {
        match name {
            "total" => Ok(MajoritySign::Total),
            "frequency" => Ok(MajoritySign::Frequency),
            _ => Err(format!(
                "unknown majority sign method {name:?}: expected total or frequency"
            )),
        }
    }
}

impl fmt::Display for MajoritySign {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str(match self {
            MajoritySign::Total => "total",
            MajoritySign::Frequency => "frequency",
        })
    }
}

impl Combine {
    /// Check that the parameters fit the method: a density in range where one is needed,
    /// none given where the method would ignore it, a positive SVD rank.
    pub fn check(&self) -> Result<(), String> {
        let method = self.method;
        match (method.prunes(), self.density) {
            (true, None) => return Err(format!("--combine {method} needs --density")),
            (false, Some(_)) => {
                return Err(format!("--density does not apply to --combine {method}"))
            }
            (true, Some(d)) if !(0.0..=1.0).contains(&d) => {
                return Err(format!("--density {d} is not between 0 and 1"))
            }
            // DARE divides the kept values by the density.
            (true, Some(d)) if method.is_random() && d == 0.0 => {
                return Err(format!(
                    "--combine {method} needs a density above 0: it rescales by 1/density"
                ))
            }
            _ => {}
        }
        if !method.elects_sign() && self.majority_sign != MajoritySign::Total {
            return Err(format!(
                "--majority-sign does not apply to --combine {method}"
            ));
        }
        match (method, self.svd_rank) {
            (Method::Svd, Some(0)) => Err("--svd-rank must be at least 1".into()),
            (Method::Svd, _) | (_, None) => Ok(()),
            (_, Some(_)) => Err(format!("--svd-rank does not apply to --combine {method}")),
        }
    }
}

impl fmt::Display for Combine {
    /// `ties density=0.5 majority_sign=total`: the method and the parameters it uses.
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        write!(f, "{}", self.method)?;
        if let Some(density) = self.density {
            write!(f, " density={density}")?;
        }
        if self.method.elects_sign() {
            write!(f, " majority_sign={}", self.majority_sign)?;
        }
        if self.method == Method::Svd {
            match self.svd_rank {
                Some(rank) => write!(f, " svd_rank={rank}")?,
                None => write!(f, " svd_rank=max")?,
            }
        }
        if self.method.is_random() {
            write!(f, " seed={}", self.seed)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn combine(method: Method, density: Option<f64>) -> Combine {
        Combine {
            method,
            density,
            majority_sign: MajoritySign::Total,
            svd_rank: None,
            seed: 0,
        }
    }

    #[test]
    fn names_round_trip_and_dense_svd_variants_are_refused_by_name() {
        for method in Method::ALL {
            assert_eq!(method.name().parse::<Method>(), Ok(method));
        }
        for name in DENSE_SVD {
            let err = name.parse::<Method>().unwrap_err();
            assert!(err.contains(name) && err.contains("not supported"), "{err}");
        }
        assert!("average".parse::<Method>().unwrap_err().contains("unknown"));
    }

    #[test]
    fn parameters_must_fit_the_method() {
        assert!(combine(Method::Ties, Some(0.5)).check().is_ok());
        assert!(combine(Method::Ties, None).check().is_err());
        assert!(combine(Method::Ties, Some(1.5)).check().is_err());
        assert!(combine(Method::MagnitudePrune, Some(0.0)).check().is_ok());
        assert!(combine(Method::DareLinear, Some(0.0)).check().is_err());
        assert!(combine(Method::Linear, Some(0.5)).check().is_err());
        let mut svd = combine(Method::Svd, None);
        assert!(svd.check().is_ok());
        svd.svd_rank = Some(0);
        assert!(svd.check().is_err());
        let mut cat = combine(Method::Cat, None);
        cat.svd_rank = Some(4);
        assert!(cat.check().is_err());
        let mut linear = combine(Method::Linear, None);
        linear.majority_sign = MajoritySign::Frequency;
        assert!(linear.check().is_err());
    }

    #[test]
    fn display_names_the_parameters_used() {
        let mut ties = combine(Method::DareTies, Some(0.25));
        ties.seed = 7;
        assert_eq!(
            ties.to_string(),
            "dare_ties density=0.25 majority_sign=total seed=7"
        );
        assert_eq!(combine(Method::Svd, None).to_string(), "svd svd_rank=max");
    }
}
