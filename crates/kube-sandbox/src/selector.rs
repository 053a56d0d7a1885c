//! Label and field selectors as the API server parses them from `labelSelector` and
//! `fieldSelector` query parameters.
//!
//! Field selectors compare a dotted path (`metadata.name`, `status.phase`, ...) as a string;
//! which paths a type accepts is decided by `ResourceType::check_field_selector`, after the
//! real server's lists.

use serde_json::Value;

use super::error::ApiError;

#[derive(Debug, Clone, PartialEq)]
enum Op {
    Eq(String),
    NotEq(String),
    In(Vec<String>),
    NotIn(Vec<String>),
    Exists,
    NotExists,
    Gt(i64),
    Lt(i64),
}

/// A parsed label selector: every requirement must hold.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct LabelSelector {
    reqs: Vec<(String, Op)>,
}

fn tokenize(s: &str) -> Vec<String> {
    let mut tokens = Vec::new();
    let mut cur = String::new();
    let chars: Vec<char> = s.chars().collect();
    let mut i = 0;
    let flush = |cur: &mut String, tokens: &mut Vec<String>| {
        if !cur.is_empty() {
            tokens.push(std::mem::take(cur));
        }
    };
    while i < chars.len() {
        let c = chars[i];
        match c {
            ' ' | '\t' => flush(&mut cur, &mut tokens),
            ',' | '(' | ')' => {
                flush(&mut cur, &mut tokens);
                tokens.push(c.to_string());
            }
            '!' | '=' | '<' | '>' => {
                flush(&mut cur, &mut tokens);
                if (c == '!' || c == '=') && chars.get(i + 1) == Some(&'=') {
                    tokens.push(format!("{c}="));
                    i += 1;
                } else {
                    tokens.push(c.to_string());
                }
            }
            _ => cur.push(c),
        }
        i += 1;
    }
    flush(&mut cur, &mut tokens);
    tokens
}

impl LabelSelector {
    /// Parses `a=b,c!=d,e in (f,g),h notin (i),j,!k`.
    pub fn parse(s: &str) -> Result<Self, ApiError> {
        let tokens = tokenize(s);
        let mut reqs = Vec::new();
        let mut i = 0;
        let bad = |msg: &str| {
            ApiError::bad_request(format!(
                "unable to parse requirement: {msg} (in label selector {s:?})"
            ))
        };
        while i < tokens.len() {
            let tok = &tokens[i];
            if tok == "," {
                i += 1;
                continue;
            }
            if tok == "!" {
                let key = tokens
                    .get(i + 1)
                    .ok_or_else(|| bad("missing key after '!'"))?;
                reqs.push((key.clone(), Op::NotExists));
                i += 2;
                continue;
            }
            let key = tok.clone();
            let op = tokens.get(i + 1).map(String::as_str);
            match op {
                None | Some(",") => {
                    reqs.push((key, Op::Exists));
                    i += 1;
                }
                Some("=") | Some("==") | Some("!=") => {
                    let value = match tokens.get(i + 2).map(String::as_str) {
                        None | Some(",") => {
                            i += 2;
                            String::new()
                        }
                        Some(v) => {
                            i += 3;
                            v.to_string()
                        }
                    };
                    let op = if op == Some("!=") {
                        Op::NotEq(value)
                    } else {
                        Op::Eq(value)
                    };
                    reqs.push((key, op));
                }
                Some(">") | Some("<") => {
                    let value: i64 = tokens
                        .get(i + 2)
                        .and_then(|v| v.parse().ok())
                        .ok_or_else(|| bad("expected an integer"))?;
                    reqs.push((
                        key,
                        if op == Some(">") {
                            Op::Gt(value)
                        } else {
                            Op::Lt(value)
                        },
                    ));
                    i += 3;
                }
                Some(word @ ("in" | "notin")) => {
                    let not = word == "notin";
                    if tokens.get(i + 2).map(String::as_str) != Some("(") {
                        return Err(bad("expected '('"));
                    }
                    let mut values = Vec::new();
                    let mut j = i + 3;
                    loop {
                        match tokens.get(j).map(String::as_str) {
                            Some(")") => break,
                            Some(",") => {}
                            Some(v) => values.push(v.to_string()),
                            None => return Err(bad("expected ')'")),
                        }
                        j += 1;
                    }
                    reqs.push((
                        key,
                        if not {
                            Op::NotIn(values)
                        } else {
                            Op::In(values)
                        },
                    ));
                    i = j + 1;
                }
                Some(other) => return Err(bad(&format!("unexpected token {other:?}"))),
            }
        }
        Ok(Self { reqs })
    }

    /// True when the object's labels satisfy every requirement.
    pub fn matches(&self, obj: &Value) -> bool {
        let labels = obj.pointer("/metadata/labels").and_then(Value::as_object);
        let get = |k: &str| labels.and_then(|l| l.get(k)).and_then(Value::as_str);
        self.reqs.iter().all(|(key, op)| {
            let v = get(key);
            match op {
                Op::Eq(x) => v == Some(x.as_str()),
                Op::NotEq(x) => v != Some(x.as_str()),
                Op::In(xs) => v.is_some_and(|v| xs.iter().any(|x| x == v)),
                Op::NotIn(xs) => v.is_none_or(|v| !xs.iter().any(|x| x == v)),
                Op::Exists => v.is_some(),
                Op::NotExists => v.is_none(),
                Op::Gt(n) => v
                    .and_then(|v| v.parse::<i64>().ok())
                    .is_some_and(|v| v > *n),
                Op::Lt(n) => v
                    .and_then(|v| v.parse::<i64>().ok())
                    .is_some_and(|v| v < *n),
            }
        })
    }
}

/// A parsed field selector: `metadata.name=x,metadata.namespace!=y`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct FieldSelector {
    reqs: Vec<(String, bool, String)>,
}

impl FieldSelector {
    /// Parses a comma-separated list of `path=value`, `path==value`, `path!=value`.
    pub fn parse(s: &str) -> Result<Self, ApiError> {
        let mut reqs = Vec::new();
        for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (path, eq, value) = if let Some((p, v)) = part.split_once("!=") {
                (p, false, v)
            } else if let Some((p, v)) = part.split_once("==") {
                (p, true, v)
            } else if let Some((p, v)) = part.split_once('=') {
                (p, true, v)
            } else {
                return Err(ApiError::bad_request(format!(
                    "invalid selector: '{s}'; can't understand '{part}'"
                )));
            };
            reqs.push((path.trim().to_string(), eq, value.trim().to_string()));
        }
        Ok(Self { reqs })
    }

    /// The fields the selector names.
    pub fn fields(&self) -> impl Iterator<Item = &str> {
        self.reqs.iter().map(|(path, _, _)| path.as_str())
    }

    /// True when every named field (rendered as a string) compares as requested.
    pub fn matches(&self, obj: &Value) -> bool {
        self.reqs.iter().all(|(path, eq, want)| {
            let pointer = format!("/{}", path.replace('.', "/"));
            let got = match obj.pointer(&pointer) {
                None | Some(Value::Null) => String::new(),
                Some(Value::String(s)) => s.clone(),
                Some(other) => other.to_string(),
            };
            (got == *want) == *eq
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// Every operator of the label-selector grammar matches as the API server does.
    #[test]
    fn label_selector_grammar() {
        let obj = json!({"metadata": {"labels": {"app": "web", "tier": "front"}}});
        for (sel, want) in [
            ("app=web", true),
            ("app==web", true),
            ("app!=web", false),
            ("app in (web, api)", true),
            ("app notin (web)", false),
            ("tier", true),
            ("!tier", false),
            ("!missing,app=web", true),
            ("missing notin (x)", true),
            ("app=web,tier=back", false),
        ] {
            assert_eq!(
                LabelSelector::parse(sel).map(|s| s.matches(&obj)),
                Ok(want),
                "{sel}"
            );
        }
    }
}
