//! Log subjects: `<prefix>.<topic>.<key>`, each of topic and key one escaped
//! NATS subject token.
//!
//! # The escaping rule
//!
//! A NATS subject token may not be empty and may not contain `.` (the token
//! separator), whitespace, or the wildcards `*` and `>`. Topic names and keys
//! are arbitrary non-empty strings, so each is written as one token where
//!
//! - ASCII letters, digits, `-` and `_` stand for themselves;
//! - every other byte of the UTF-8 string (including `%` itself, `.`, space,
//!   `*`, `>`, `$`, and each byte of a non-ASCII character) is written `%XX`,
//!   two upper-case hexadecimal digits.
//!
//! The rule is injective (two different keys never share a token) and
//! reversible; decoding accepts only the canonical form (upper-case hex, no
//! needless escape), so one key has exactly one subject — which is what lets a
//! per-subject retention limit keep one message per key. An empty topic or
//! key is refused with [`SubjectError::Empty`], a subject longer than
//! [`MAX_SUBJECT_LEN`] with [`SubjectError::TooLong`].

/// The longest subject a change may have: 3,072 bytes, leaving room for the
/// rest of NATS' 4,096-byte control line (its default `max_control_line`).
pub const MAX_SUBJECT_LEN: usize = 3072;

/// A topic, key or subject prefix cannot be written as (or read from) a log
/// subject.
///
/// # Examples
///
/// ```
/// use snapstream::cluster::{subject_for, SubjectError};
///
/// assert_eq!(subject_for("app", "users", "a.b c").unwrap(), "app.users.a%2Eb%20c");
/// assert!(matches!(subject_for("app", "users", ""), Err(SubjectError::Empty { .. })));
/// ```
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SubjectError {
    /// The topic or key is empty.
    #[error("empty {what}")]
    Empty {
        /// `"topic"` or `"key"`.
        what: &'static str,
    },
    /// The escaped subject is longer than [`MAX_SUBJECT_LEN`].
    #[error("subject of {len} bytes exceeds {max}")]
    TooLong {
        /// The subject's length.
        len: usize,
        /// [`MAX_SUBJECT_LEN`].
        max: usize,
    },
    /// The subject prefix is not a valid NATS subject without wildcards.
    #[error("invalid subject prefix {0:?}")]
    InvalidPrefix(String),
    /// A subject read from the log is not `<prefix>.<topic>.<key>` with two
    /// canonically escaped tokens.
    #[error("malformed log subject {0:?}")]
    Malformed(String),
}

/// Whether `prefix` is a valid literal NATS subject: non-empty tokens
/// separated by `.`, no whitespace, no wildcards.
pub(crate) fn valid_prefix(prefix: &str) -> bool {
    !prefix.is_empty()
        && prefix.split('.').all(|t| {
            !t.is_empty()
                && t != "*"
                && t != ">"
                && !t.contains(|c: char| c.is_whitespace() || c == '*' || c == '>')
        })
}

fn plain(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'-' || b == b'_'
}

/// Escapes one topic or key into a subject token (see the module docs).
///
/// # Examples
///
/// ```
/// use snapstream::cluster::escape_token;
///
/// assert_eq!(escape_token("web-1"), "web-1");
/// assert_eq!(escape_token("a.b"), "a%2Eb");
/// assert_eq!(escape_token("100%"), "100%25");
/// assert_eq!(escape_token("é"), "%C3%A9");
/// ```
pub fn escape_token(s: &str) -> String {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    let mut out = String::with_capacity(s.len());
    for &b in s.as_bytes() {
        if plain(b) {
            out.push(b as char);
        } else {
            out.push('%');
            out.push(HEX[(b >> 4) as usize] as char);
            out.push(HEX[(b & 0xf) as usize] as char);
        }
    }
    out
}

/// Reverses [`escape_token`]; `None` unless `token` is the canonical escape
/// of a non-empty UTF-8 string.
///
/// # Examples
///
/// ```
/// use snapstream::cluster::unescape_token;
///
/// assert_eq!(unescape_token("a%2Eb").as_deref(), Some("a.b"));
/// assert_eq!(unescape_token("a%2eb"), None); // lower-case hex is not canonical
/// assert_eq!(unescape_token("%61"), None); // 'a' needs no escape
/// assert_eq!(unescape_token("a.b"), None);
/// ```
pub fn unescape_token(token: &str) -> Option<String> {
    fn hex(b: u8) -> Option<u8> {
        match b {
            b'0'..=b'9' => Some(b - b'0'),
            b'A'..=b'F' => Some(b - b'A' + 10),
            _ => None,
        }
    }
    if token.is_empty() {
        return None;
    }
    let bytes = token.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        if plain(b) {
            out.push(b);
            i += 1;
        } else if b == b'%' && i + 2 < bytes.len() {
            let v = hex(bytes[i + 1])? << 4 | hex(bytes[i + 2])?;
            if plain(v) {
                return None;
            }
            out.push(v);
            i += 3;
        } else {
            return None;
        }
    }
    String::from_utf8(out).ok()
}

/// The log subject of a change of `key` in `topic` under `prefix`:
/// `<prefix>.<escaped topic>.<escaped key>`.
///
/// # Errors
///
/// [`SubjectError::Empty`], [`SubjectError::InvalidPrefix`] or
/// [`SubjectError::TooLong`].
///
/// # Examples
///
/// ```
/// assert_eq!(snapstream::cluster::subject_for("st.v1", "nodes", "n 1").unwrap(), "st.v1.nodes.n%201");
/// ```
pub fn subject_for(prefix: &str, topic: &str, key: &str) -> Result<String, SubjectError> {
    if !valid_prefix(prefix) {
        return Err(SubjectError::InvalidPrefix(prefix.to_string()));
    }
    if topic.is_empty() {
        return Err(SubjectError::Empty { what: "topic" });
    }
    if key.is_empty() {
        return Err(SubjectError::Empty { what: "key" });
    }
    let subject = format!("{prefix}.{}.{}", escape_token(topic), escape_token(key));
    if subject.len() > MAX_SUBJECT_LEN {
        return Err(SubjectError::TooLong {
            len: subject.len(),
            max: MAX_SUBJECT_LEN,
        });
    }
    Ok(subject)
}

/// Splits a log subject back into (topic, key).
pub(crate) fn parse_subject(prefix: &str, subject: &str) -> Result<(String, String), SubjectError> {
    let malformed = || SubjectError::Malformed(subject.to_string());
    let rest = subject
        .strip_prefix(prefix)
        .and_then(|r| r.strip_prefix('.'))
        .ok_or_else(malformed)?;
    let (topic, key) = rest.split_once('.').ok_or_else(malformed)?;
    let topic = unescape_token(topic).ok_or_else(malformed)?;
    let key = unescape_token(key).ok_or_else(malformed)?;
    Ok((topic, key))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escape_round_trips_awkward_keys() {
        for key in [
            "a", "a.b", "a b", "*", ">", "%", "%25", "é", "a\tb", "..", "-_", "$SYS",
        ] {
            let token = escape_token(key);
            assert!(token.bytes().all(|b| plain(b) || b == b'%'), "{token}");
            assert_eq!(unescape_token(&token).as_deref(), Some(key), "{key}");
        }
    }

    #[test]
    fn distinct_keys_get_distinct_subjects() {
        let a = subject_for("p", "t", "a.b").unwrap();
        let b = subject_for("p", "t", "a%2Eb").unwrap();
        assert_ne!(a, b);
        assert_eq!(parse_subject("p", &a).unwrap(), ("t".into(), "a.b".into()));
        assert_eq!(
            parse_subject("p", &b).unwrap(),
            ("t".into(), "a%2Eb".into())
        );
    }

    #[test]
    fn bad_subjects_are_refused() {
        assert!(matches!(
            subject_for("p", "", "k"),
            Err(SubjectError::Empty { what: "topic" })
        ));
        assert!(matches!(
            subject_for("p", "t", ""),
            Err(SubjectError::Empty { what: "key" })
        ));
        for prefix in ["", "a..b", "a.*", "a.>", "a b", ".a", "a."] {
            assert!(
                matches!(
                    subject_for(prefix, "t", "k"),
                    Err(SubjectError::InvalidPrefix(_))
                ),
                "{prefix:?}"
            );
        }
        let long = "x".repeat(MAX_SUBJECT_LEN);
        assert!(matches!(
            subject_for("p", "t", &long),
            Err(SubjectError::TooLong { .. })
        ));
        for s in [
            "p.t",
            "q.t.k",
            "p.t.k.extra",
            "p.t.%2",
            "p.t.%zz",
            "p.t.%FF",
            "p.t.%41",
            "p..k",
        ] {
            assert!(
                matches!(parse_subject("p", s), Err(SubjectError::Malformed(_))),
                "{s}"
            );
        }
    }
}
