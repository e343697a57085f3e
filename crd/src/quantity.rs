//! Parsing of the Kubernetes quantities used for memory and disk sizes.
//!
//! The API server validates `spec.*.memory` and `spec.*.disk` with CEL's `quantity()`;
//! this turns an accepted value into bytes. Fractions and exponents are accepted as the
//! API server accepts them, rounded up to whole bytes.

use std::fmt;

/// Why a string is not a byte quantity.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QuantityError {
    input: String,
    reason: &'static str,
}

impl fmt::Display for QuantityError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "invalid quantity {:?}: {}", self.input, self.reason)
    }
}

impl std::error::Error for QuantityError {}

const SUFFIXES: [(&str, u128); 12] = [
    ("Ki", 1 << 10),
    ("Mi", 1 << 20),
    ("Gi", 1 << 30),
    ("Ti", 1 << 40),
    ("Pi", 1 << 50),
    ("Ei", 1 << 60),
    ("k", 1_000),
    ("M", 1_000_000),
    ("G", 1_000_000_000),
    ("T", 1_000_000_000_000),
    ("P", 1_000_000_000_000_000),
    ("E", 1_000_000_000_000_000_000),
];

/// Parses a quantity such as `4Gi`, `512M`, `1.5Gi` or `1e9` into bytes.
pub fn parse_bytes(input: &str) -> Result<u64, QuantityError> {
    let err = |reason| QuantityError {
        input: input.chars().take(64).collect(),
        reason,
    };
    let s = input.trim();
    if s.is_empty() {
        return Err(err("empty"));
    }
    let (number, multiplier) = match SUFFIXES.iter().find(|(suffix, _)| s.ends_with(suffix)) {
        Some((suffix, m)) => (&s[..s.len() - suffix.len()], *m),
        None => match s.find(['e', 'E']) {
            Some(pos) => {
                let exponent: u32 = s[pos + 1..].parse().map_err(|_| err("bad exponent"))?;
                let m = 10u128
                    .checked_pow(exponent)
                    .ok_or_else(|| err("too large"))?;
                (&s[..pos], m)
            }
            None => (s, 1),
        },
    };
    let (whole, fraction) = number.split_once('.').unwrap_or((number, ""));
    if whole.is_empty() && fraction.is_empty() {
        return Err(err("no digits"));
    }
    if !whole.bytes().all(|b| b.is_ascii_digit()) || !fraction.bytes().all(|b| b.is_ascii_digit()) {
        return Err(err("not a non-negative decimal number"));
    }
    if fraction.len() > 18 {
        return Err(err("too many decimal places"));
    }
    let whole: u128 = if whole.is_empty() {
        0
    } else {
        whole.parse().map_err(|_| err("too large"))?
    };
    let scale = 10u128.pow(fraction.len() as u32);
    let fraction: u128 = if fraction.is_empty() {
        0
    } else {
        fraction.parse().map_err(|_| err("too large"))?
    };
    let bytes = whole
        .checked_mul(multiplier)
        .and_then(|w| {
            let f = fraction.checked_mul(multiplier)?.div_ceil(scale);
            w.checked_add(f)
        })
        .ok_or_else(|| err("too large"))?;
    u64::try_from(bytes).map_err(|_| err("too large"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn binary_and_decimal_suffixes() {
        assert_eq!(parse_bytes("4Gi"), Ok(4 << 30));
        assert_eq!(parse_bytes("256Mi"), Ok(256 << 20));
        assert_eq!(parse_bytes("80G"), Ok(80_000_000_000));
        assert_eq!(parse_bytes("1.5Gi"), Ok(3 << 29));
        assert_eq!(parse_bytes("1e9"), Ok(1_000_000_000));
        assert_eq!(parse_bytes("1024"), Ok(1024));
        assert_eq!(parse_bytes(".5Ki"), Ok(512));
    }

    #[test]
    fn rejects_garbage() {
        for bad in [
            "",
            "Gi",
            "-1Gi",
            "4 Gi",
            "4GB",
            "1.2.3",
            "$(reboot)",
            "9999999Ei",
            ".",
        ] {
            assert!(parse_bytes(bad).is_err(), "{bad:?} accepted");
        }
    }

    proptest! {
        #[test]
        fn never_panics(s in "\\PC{0,40}") {
            let _ = parse_bytes(&s);
        }

        #[test]
        fn mebibytes_round_trip(n in 0u64..(1 << 30)) {
            prop_assert_eq!(parse_bytes(&format!("{n}Mi")), Ok(n << 20));
        }
    }
}
