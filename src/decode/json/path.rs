//! Field paths into a JSON payload: keys joined by `.` (`ENERGY.Total`), array elements by
//! their index (`ENERGY.Power[1]`), and keys that hold `.`, `[` or `"` quoted in brackets
//! (`sensors["temp.c"]`, `["a.b"].c`). Read one step at a time while the payload is walked.

use std::borrow::Cow;

/// The first step of a path.
#[derive(Debug, PartialEq)]
pub enum Head<'p> {
    Key(Cow<'p, str>),
    Index(usize),
}

/// Splits `path` into its first step and the rest (without the `.` between them); `None`
/// when the path is empty or does not parse ([`check`] says why).
pub fn head(path: &str) -> Option<(Head<'_>, &str)> {
    split(path).ok().flatten()
}

/// Whether every step of `path` parses: what loading a config asks of a metric's `field`
/// and of a JSON `timestamp_field`.
///
/// # Errors
/// A sentence naming the place in the path that does not parse.
pub fn check(path: &str) -> Result<(), String> {
    if path.is_empty() {
        return Err("the path is empty".into());
    }
    let mut rest = path;
    while !rest.is_empty() {
        match split(rest)? {
            Some((_, next)) => rest = next,
            None => return Err(format!("`{rest}` is not a key or an [index]")),
        }
    }
    Ok(())
}

fn split(path: &str) -> Result<Option<(Head<'_>, &str)>, String> {
    let Some(bracketed) = path.strip_prefix('[') else {
        let end = path.find(['.', '[']).unwrap_or(path.len());
        if end == 0 {
            return Ok(None);
        }
        let (key, rest) = path.split_at(end);
        if key.contains(['"', ']']) {
            return Err(format!(
                "key `{key}` holds `\"` or `]`: quote it in brackets, as [\"{key}\"]"
            ));
        }
        return Ok(Some((Head::Key(Cow::Borrowed(key)), after(rest)?)));
    };
    if let Some(quoted) = bracketed.strip_prefix('"') {
        // A JSON string: its end is the first `"` not escaped.
        let mut escaped = false;
        let close = quoted.char_indices().find_map(|(i, c)| {
            let end = !escaped && c == '"';
            escaped = !escaped && c == '\\';
            end.then_some(i)
        });
        let Some(close) = close else {
            return Err(format!("`{path}`: the quoted key has no closing `\"`"));
        };
        let inner = &quoted[..close];
        let key: Cow<'_, str> = if inner.contains('\\') {
            let literal = &bracketed[..close + 2];
            Cow::Owned(
                serde_json::from_str(literal)
                    .map_err(|err| format!("`{literal}` is not a JSON string: {err}"))?,
            )
        } else {
            Cow::Borrowed(inner)
        };
        let Some(rest) = quoted[close + 1..].strip_prefix(']') else {
            return Err(format!("`{path}`: expected `]` after the quoted key"));
        };
        return Ok(Some((Head::Key(key), after(rest)?)));
    }
    let Some(close) = bracketed.find(']') else {
        return Err(format!("`{path}`: `[` has no closing `]`"));
    };
    let digits = &bracketed[..close];
    // Digits only: `[+1]`, `[ 1]` and `[01]` name no element a sensor's array has.
    let index = match digits.parse::<usize>() {
        Ok(index) if digits.bytes().all(|b| b.is_ascii_digit()) && digits == index.to_string() => {
            index
        }
        _ => {
            return Err(format!(
                "`[{digits}]` is not an array index (digits, from 0) or a quoted key"
            ));
        }
    };
    Ok(Some((Head::Index(index), after(&bracketed[close + 1..])?)))
}

/// What follows a step: nothing, `.` and a key, or a bracket.
fn after(rest: &str) -> Result<&str, String> {
    if rest.is_empty() || rest.starts_with('[') {
        return Ok(rest);
    }
    match rest.strip_prefix('.') {
        Some(next) if !next.is_empty() && !next.starts_with(['.', '[']) => Ok(next),
        Some(_) => Err(format!("`{rest}`: expected a key after `.`")),
        None => Err(format!("expected `.` or `[` before `{rest}`")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn steps(path: &str) -> Vec<Head<'_>> {
        let mut steps = Vec::new();
        let mut rest = path;
        while let Some((step, next)) = head(rest) {
            steps.push(step);
            rest = next;
        }
        assert!(rest.is_empty(), "{path} stopped at {rest}");
        steps
    }

    fn key(k: &str) -> Head<'_> {
        Head::Key(Cow::Borrowed(k))
    }

    #[test]
    fn paths_read_as_keys_indices_and_quoted_keys() {
        assert_eq!(steps("temp"), vec![key("temp")]);
        assert_eq!(steps("ENERGY.Total"), vec![key("ENERGY"), key("Total")]);
        assert_eq!(
            steps("ENERGY.Power[1]"),
            vec![key("ENERGY"), key("Power"), Head::Index(1)]
        );
        assert_eq!(
            steps("a[0][12].b"),
            vec![key("a"), Head::Index(0), Head::Index(12), key("b")]
        );
        assert_eq!(steps(r#"["a.b"].c"#), vec![key("a.b"), key("c")]);
        assert_eq!(
            steps(r#"s["x\"]"]"#),
            vec![key("s"), Head::Key(Cow::Owned("x\"]".into()))]
        );
        assert_eq!(steps("[3]"), vec![Head::Index(3)]);
    }

    #[test]
    fn a_path_that_does_not_parse_is_named() {
        for (path, says) in [
            ("", "empty"),
            ("a.", "expected a key after `.`"),
            ("a..b", "expected a key after `.`"),
            (".a", "is not a key"),
            ("a[1", "no closing `]`"),
            ("a[-1]", "not an array index"),
            ("a[01]", "not an array index"),
            ("a[x]", "not an array index"),
            ("a[1]b", "expected `.` or `[` before `b`"),
            (r#"a["b"#, "no closing `\"`"),
            (r#"a["b"x]"#, "expected `]`"),
            ("a]", "quote it in brackets"),
        ] {
            let err = check(path).unwrap_err();
            assert!(err.contains(says), "{path}: {err}");
        }
        for path in [
            "a",
            "a.b",
            "a[0]",
            r#"["a.b"]"#,
            "a[1].b[2]",
            "ENERGY.Power[1]",
        ] {
            assert_eq!(check(path), Ok(()), "{path}");
        }
    }
}
