//! Module hashes as text: how they are printed in messages and named in the
//! client API.

/// Lower-case hex of a hash, for messages and the client API.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Parses a hex SHA-256, as [`hex`] writes it.
pub fn parse_hash(text: &str) -> Result<[u8; 32], String> {
    let text = text.trim();
    let bad = || format!("{text:?} is not a module hash (64 hex digits)");
    if text.len() != 64 {
        return Err(bad());
    }
    let mut out = [0u8; 32];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&text[2 * i..2 * i + 2], 16).map_err(|_| bad())?;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hashes_round_trip_through_hex_and_bad_ones_are_refused() {
        let hash = [0xab; 32];
        assert_eq!(parse_hash(&hex(&hash)), Ok(hash));
        assert!(parse_hash("abc").is_err());
        assert!(parse_hash(&"zz".repeat(32)).is_err());
    }
}
