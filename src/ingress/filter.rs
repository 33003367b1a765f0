//! Routing by content: a destination's `filter` decides, at ingress, whether
//! a callback is queued for it at all.
//!
//! A condition tests a JSON body field, by dotted path with array indexes
//! (`deviceIds[0].kind`), or a request header: `equals` a value, `in` a
//! list, `exists`, or starts with a `prefix`; strings optionally compared
//! case-insensitively. Conditions combine with `all`, `any` and `not`. A
//! body that is not JSON never matches a body condition (ingress counts
//! it). The body is parsed once per request, and only when some filter of
//! the route looks at it.

use http::{HeaderMap, HeaderName};
use serde_json::Value;

pub use crate::fieldpath::{lookup, parse_path, Step};

/// What a condition looks at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    Body(Vec<Step>),
    Header(HeaderName),
}

/// What it tests.
#[derive(Debug, Clone, PartialEq)]
pub enum Test {
    Equals(Value),
    In(Vec<Value>),
    Exists(bool),
    Prefix(String),
}

/// A validated filter.
#[derive(Debug, Clone, PartialEq)]
pub enum Filter {
    All(Vec<Filter>),
    Any(Vec<Filter>),
    Not(Box<Filter>),
    Cond { target: Target, test: Test, case_insensitive: bool },
}

/// The request a filter is evaluated on: headers, and the body parsed
/// (`None`: not JSON, or not parsed because nothing looks at it).
pub struct Subject<'a> {
    pub headers: &'a HeaderMap,
    pub body: Option<&'a Value>,
}

impl Filter {
    /// Whether any condition of the filter looks at the body.
    pub fn reads_body(&self) -> bool {
        match self {
            Filter::All(fs) | Filter::Any(fs) => fs.iter().any(Filter::reads_body),
            Filter::Not(f) => f.reads_body(),
            Filter::Cond { target, .. } => matches!(target, Target::Body(_)),
        }
    }

    pub fn matches(&self, s: &Subject<'_>) -> bool {
        match self {
            Filter::All(fs) => fs.iter().all(|f| f.matches(s)),
            Filter::Any(fs) => fs.iter().any(|f| f.matches(s)),
            Filter::Not(f) => !f.matches(s),
            Filter::Cond { target, test, case_insensitive } => {
                let found: Option<Value> = match target {
                    // A body that is not JSON never matches a body condition,
                    // not even `exists = false` (it has no fields to lack).
                    Target::Body(steps) => match s.body {
                        None => return false,
                        Some(body) => lookup(body, steps).cloned(),
                    },
                    Target::Header(name) => {
                        s.headers.get(name).and_then(|v| v.to_str().ok()).map(|v| Value::String(v.to_string()))
                    }
                };
                test.holds(found.as_ref(), *case_insensitive)
            }
        }
    }
}

fn same(a: &Value, b: &Value, ci: bool) -> bool {
    match (a, b) {
        (Value::String(x), Value::String(y)) if ci => x.eq_ignore_ascii_case(y),
        // 4 and 4.0 are the same number to a sender writing JSON by hand.
        (Value::Number(x), Value::Number(y)) => x.as_f64() == y.as_f64(),
        _ => a == b,
    }
}

impl Test {
    fn holds(&self, found: Option<&Value>, ci: bool) -> bool {
        match (self, found) {
            (Test::Exists(want), f) => f.is_some() == *want,
            (_, None) => false,
            (Test::Equals(v), Some(f)) => same(f, v, ci),
            (Test::In(vs), Some(f)) => vs.iter().any(|v| same(f, v, ci)),
            (Test::Prefix(p), Some(Value::String(f))) => {
                if ci {
                    f.len() >= p.len() && f.is_char_boundary(p.len()) && f[..p.len()].eq_ignore_ascii_case(p)
                } else {
                    f.starts_with(p.as_str())
                }
            }
            (Test::Prefix(_), Some(_)) => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn body(f: &Filter, v: &Value) -> bool {
        f.matches(&Subject { headers: &HeaderMap::new(), body: Some(v) })
    }

    fn cond(path: &str, test: Test, ci: bool) -> Filter {
        Filter::Cond { target: Target::Body(parse_path(path).expect("path")), test, case_insensitive: ci }
    }

    #[test]
    fn paths_parse_with_indexes_and_refuse_what_cannot_be_evaluated() {
        assert_eq!(
            parse_path("deviceIds[0].kind").expect("path"),
            vec![Step::Key("deviceIds".into()), Step::Index(0), Step::Key("kind".into())]
        );
        assert_eq!(parse_path("a[1][2]").expect("path"), vec![Step::Key("a".into()), Step::Index(1), Step::Index(2)]);
        for bad in ["", "a..b", "a[", "a[x]", "a[0]b", ".a"] {
            assert!(parse_path(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn conditions_on_a_thingspace_callback() {
        let cb = json!({"username": "acct-A", "callbackCount": 1, "deviceIds": [{"id": "8914", "kind": "Iccid"}]});
        assert!(body(&cond("username", Test::In(vec![json!("acct-A"), json!("acct-C")]), false), &cb));
        assert!(!body(&cond("username", Test::In(vec![json!("acct-B")]), false), &cb));
        assert!(body(&cond("deviceIds[0].kind", Test::Equals(json!("iccid")), true), &cb));
        assert!(!body(&cond("deviceIds[0].kind", Test::Equals(json!("iccid")), false), &cb));
        assert!(body(&cond("callbackCount", Test::Equals(json!(1.0)), false), &cb));
        assert!(body(&cond("deviceIds[1]", Test::Exists(false), false), &cb));
        assert!(body(&cond("username", Test::Prefix("ACCT-".into()), true), &cb));
        let not_b = Filter::Not(Box::new(cond("username", Test::Equals(json!("acct-B")), false)));
        let any = Filter::Any(vec![cond("nope", Test::Exists(true), false), not_b.clone()]);
        assert!(body(&Filter::All(vec![any, not_b]), &cb));
        // Not JSON: no body condition matches, whatever it tests.
        let none = Subject { headers: &HeaderMap::new(), body: None };
        assert!(!cond("username", Test::Exists(false), false).matches(&none));
    }

    #[test]
    fn header_conditions() {
        let mut h = HeaderMap::new();
        h.insert("x-account", "A".parse().expect("value"));
        let f = Filter::Cond {
            target: Target::Header(HeaderName::from_static("x-account")),
            test: Test::Equals(json!("a")),
            case_insensitive: true,
        };
        assert!(f.matches(&Subject { headers: &h, body: None }));
        assert!(!f.reads_body());
    }
}
