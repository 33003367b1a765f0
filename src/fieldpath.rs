//! A field of a JSON body, by path (`deviceIds[0].kind`, `a.b.0.c`):
//! what routes index and de-duplicate by, filters test, and failure log
//! lines name. A leaf: ingress evaluates paths, delivery reads indexed
//! fields for its log lines.

use serde_json::Value;

/// One step of a body path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    Key(String),
    Index(usize),
}

/// Parses `a.b[0].c` (keys separated by dots, `[n]` indexes after a key;
/// a numeric key, `a.b.0.c`, indexes an array too).
pub fn parse_path(path: &str) -> Result<Vec<Step>, String> {
    if path.is_empty() {
        return Err("empty path".into());
    }
    let mut steps = Vec::new();
    for part in path.split('.') {
        let (key, mut rest) = match part.find('[') {
            Some(i) => (&part[..i], &part[i..]),
            None => (part, ""),
        };
        if key.is_empty() && (steps.is_empty() || rest.is_empty()) {
            return Err(format!("empty key in path {path:?}"));
        }
        if !key.is_empty() {
            steps.push(Step::Key(key.to_string()));
        }
        while !rest.is_empty() {
            let close = rest.find(']').ok_or_else(|| format!("unclosed [ in path {path:?}"))?;
            let index: usize = rest[1..close]
                .parse()
                .map_err(|_| format!("index {:?} in path {path:?} is not a number", &rest[1..close]))?;
            steps.push(Step::Index(index));
            rest = &rest[close + 1..];
            if !rest.is_empty() && !rest.starts_with('[') {
                return Err(format!("unexpected {rest:?} after an index in path {path:?}"));
            }
        }
    }
    Ok(steps)
}

/// The value at `steps` in `v`, if there is one.
pub fn lookup<'a>(mut v: &'a Value, steps: &[Step]) -> Option<&'a Value> {
    for step in steps {
        v = match step {
            // A numeric key indexes an array: `deviceIds.0.id` reads as
            // `deviceIds[0].id`.
            Step::Key(k) => match v {
                Value::Array(items) => items.get(k.parse::<usize>().ok()?)?,
                _ => v.as_object()?.get(k)?,
            },
            Step::Index(i) => v.as_array()?.get(*i)?,
        };
    }
    Some(v)
}
