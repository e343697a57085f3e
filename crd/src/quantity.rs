//! Parsing of the Kubernetes quantities used for memory and disk sizes.
//!
//! The API server validates `spec.*.memory` and `spec.*.disk` with CEL's `quantity()`;
//! this turns an accepted value into bytes. Every form of Kubernetes' quantity grammar
//! is accepted as the API server accepts it (a leading `+`, fractions, the `m` suffix,
//! signed exponents such as `5e-3`), rounded up to whole bytes, so that no value the
//! schema lets through is refused here.

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

/// Suffix, then the value of one unit as numerator / denominator.
const SUFFIXES: [(&str, u128, u128); 13] = [
    ("Ki", 1 << 10, 1),
    ("Mi", 1 << 20, 1),
    ("Gi", 1 << 30, 1),
    ("Ti", 1 << 40, 1),
    ("Pi", 1 << 50, 1),
    ("Ei", 1 << 60, 1),
    ("m", 1, 1_000),
    ("k", 1_000, 1),
    ("M", 1_000_000, 1),
    ("G", 1_000_000_000, 1),
    ("T", 1_000_000_000_000, 1),
    ("P", 1_000_000_000_000_000, 1),
    ("E", 1_000_000_000_000_000_000, 1),
];

/// Parses a quantity such as `4Gi`, `512M`, `1.5Gi`, `+2Gi`, `1e9` or `2500e-3` into
/// bytes, rounding a fraction of a byte up.
pub fn parse_bytes(input: &str) -> Result<u64, QuantityError> {
    let err = |reason| QuantityError {
        input: input.chars().take(64).collect(),
        reason,
    };
    let s = input.trim();
    // Kubernetes allows a sign; a negative size is refused below as not a number.
    let s = s.strip_prefix('+').unwrap_or(s);
    if s.is_empty() {
        return Err(err("empty"));
    }
    let (number, numerator, denominator) =
        match SUFFIXES.iter().find(|(suffix, _, _)| s.ends_with(suffix)) {
            Some((suffix, n, d)) => (&s[..s.len() - suffix.len()], *n, *d),
            None => match s.find(['e', 'E']) {
                Some(pos) => {
                    let exponent: i32 = s[pos + 1..].parse().map_err(|_| err("bad exponent"))?;
                    let power = 10u128
                        .checked_pow(exponent.unsigned_abs())
                        .ok_or_else(|| err("exponent out of range"))?;
                    if exponent >= 0 {
                        (&s[..pos], power, 1)
                    } else {
                        (&s[..pos], 1, power)
                    }
                }
                None => (s, 1, 1),
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
    let parse = |digits: &str| -> Result<u128, QuantityError> {
        if digits.is_empty() {
            Ok(0)
        } else {
            digits.parse().map_err(|_| err("too large"))
        }
    };
    let scale = 10u128.pow(fraction.len() as u32);
    // number = (whole * scale + fraction) / scale; bytes = number * numerator / denominator.
    let bytes = parse(whole)?
        .checked_mul(scale)
        .and_then(|w| w.checked_add(parse(fraction).ok()?))
        .and_then(|n| n.checked_mul(numerator))
        .and_then(|n| Some(n.div_ceil(scale.checked_mul(denominator)?)))
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

    /// Forms of Kubernetes' quantity grammar that CEL's `isQuantity` accepts, so the
    /// schema lets them through: each must come out as the API server's value.
    #[test]
    fn every_form_the_api_server_accepts() {
        assert_eq!(parse_bytes("+4Gi"), Ok(4 << 30));
        assert_eq!(parse_bytes("2147483648000m"), Ok(2 << 30));
        assert_eq!(
            parse_bytes("1500m"),
            Ok(2),
            "a fraction of a byte rounds up"
        );
        assert_eq!(parse_bytes("2684354560000e-3"), Ok(2_684_354_560));
        assert_eq!(parse_bytes("4294967296E-1"), Ok(429_496_730));
        assert_eq!(parse_bytes("1e+9"), Ok(1_000_000_000));
        assert_eq!(
            parse_bytes("1E3"),
            Ok(1_000),
            "E followed by digits is an exponent"
        );
        assert_eq!(
            parse_bytes("1E"),
            Ok(1_000_000_000_000_000_000),
            "E alone is exa"
        );
        assert_eq!(parse_bytes("0.5e1"), Ok(5));
        assert_eq!(parse_bytes("4.Gi"), Ok(4 << 30));
        assert_eq!(parse_bytes("004Gi"), Ok(4 << 30));
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
            "+",
            "+-1Gi",
            "1e",
            "1e1.5",
            "1e99",
            "1e3Gi",
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
