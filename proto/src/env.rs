//! Names of environment variables made from free text (a build property's
//! key, a fuzz target's name): one spelling for every such name.

/// `prefix` and `key` upper-cased, each character of `key` that is not an
/// ASCII letter or digit written as `_`: `("NIGHTSHIFT_PROP_", "git.sha")` →
/// `NIGHTSHIFT_PROP_GIT_SHA`.
pub fn variable_name(prefix: &str, key: &str) -> String {
    let key: String = key
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_uppercase()
            } else {
                '_'
            }
        })
        .collect();
    format!("{prefix}{key}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_other_character_becomes_an_underscore() {
        assert_eq!(
            variable_name("NIGHTSHIFT_PROP_", "git.sha-1"),
            "NIGHTSHIFT_PROP_GIT_SHA_1"
        );
        assert_eq!(variable_name("P_", "é x"), "P___X");
    }
}
