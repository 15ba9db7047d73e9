//! A small YAML loader that keeps what serde-based loaders hide: whether a
//! scalar was quoted. YAML 1.1 tools (the original dsg used PyYAML) read bare
//! `yes/no/on/off/y/n` as booleans, YAML 1.2 reads them as strings; a config
//! such as `name: no` therefore means different things to different tools.
//! We load with YAML 1.2 core-schema typing and report each such scalar so the
//! caller can refuse it instead of silently picking one meaning.
//! Duplicate keys are an error: loaders keep the last one silently, so a
//! second `name:` further down would quietly win.

use std::collections::HashMap;

use serde_json::{Map, Number, Value};
use yaml_rust2::parser::{Event, MarkedEventReceiver, Parser};
use yaml_rust2::scanner::{Marker, TScalarStyle};

/// A bare scalar whose meaning differs between YAML 1.1 and 1.2.
#[derive(Debug, Clone, PartialEq)]
pub struct Ambiguous {
    /// Dotted key path, e.g. `repository.host` or `data_dirs[1]`.
    pub key: String,
    pub text: String,
    pub line: usize,
}

#[derive(Debug, thiserror::Error)]
pub enum YamlError {
    #[error("{0}")]
    Syntax(String),
    #[error("line {line}: {msg}")]
    Unsupported { line: usize, msg: String },
    #[error("line {line}: duplicate key '{key}' (first at line {first})")]
    Duplicate {
        /// Dotted key path, as in [`Ambiguous::key`].
        key: String,
        line: usize,
        first: usize,
    },
}

enum Frame {
    /// The mapping so far, the key awaiting its value, and the line of each
    /// key seen (for the duplicate-key error).
    Map(Map<String, Value>, Option<String>, HashMap<String, usize>),
    Seq(Vec<Value>),
}

struct Builder {
    stack: Vec<Frame>,
    keys: Vec<String>,
    root: Option<Value>,
    ambiguous: Vec<Ambiguous>,
    error: Option<YamlError>,
}

impl Builder {
    fn path(&self) -> String {
        self.keys.join(".").replace(".[", "[")
    }

    fn push_value(&mut self, v: Value, line: usize) {
        match self.stack.last_mut() {
            None => self.root = Some(v),
            Some(Frame::Seq(items)) => items.push(v),
            Some(Frame::Map(m, pending, lines)) => match pending.take() {
                None => {
                    let k = match v {
                        Value::String(s) => s,
                        Value::Null => "null".into(),
                        other => other.to_string(),
                    };
                    if let Some(&first) = lines.get(&k) {
                        let mut key = self.keys.join(".").replace(".[", "[");
                        key = if key.is_empty() {
                            k
                        } else {
                            format!("{key}.{k}")
                        };
                        self.error = Some(YamlError::Duplicate { key, line, first });
                        return;
                    }
                    lines.insert(k.clone(), line);
                    *pending = Some(k);
                }
                Some(k) => {
                    m.insert(k, v);
                }
            },
        }
    }

    /// The key path a value about to be pushed will get.
    fn child_key(&self) -> Option<String> {
        match self.stack.last() {
            Some(Frame::Map(_, Some(k), _)) => Some(k.clone()),
            Some(Frame::Seq(items)) => Some(format!("[{}]", items.len())),
            _ => None,
        }
    }
}

/// The words PyYAML (YAML 1.1) resolves to booleans that YAML 1.2 reads as
/// strings. PyYAML does not treat `y`/`n` as booleans, so neither do we.
fn is_yaml11_bool_word(s: &str) -> bool {
    matches!(
        s,
        "yes" | "Yes" | "YES" | "no" | "No" | "NO" | "on" | "On" | "ON" | "off" | "Off" | "OFF"
    )
}

fn plain_scalar(s: &str) -> Value {
    match s {
        "" | "~" | "null" | "Null" | "NULL" => return Value::Null,
        "true" | "True" | "TRUE" => return Value::Bool(true),
        "false" | "False" | "FALSE" => return Value::Bool(false),
        _ => {}
    }
    if let Ok(i) = s.parse::<i64>() {
        return Value::Number(i.into());
    }
    if s.chars().any(|c| c.is_ascii_digit()) && !s.contains(':') {
        if let Ok(f) = s.parse::<f64>() {
            if let Some(n) = Number::from_f64(f) {
                return Value::Number(n);
            }
        }
    }
    Value::String(s.to_string())
}

impl MarkedEventReceiver for Builder {
    fn on_event(&mut self, ev: Event, mark: Marker) {
        if self.error.is_some() {
            return;
        }
        match ev {
            Event::Scalar(text, style, anchor, _tag) => {
                if anchor != 0 {
                    self.error = Some(YamlError::Unsupported {
                        line: mark.line(),
                        msg: "anchors are not supported in dsg config files".into(),
                    });
                    return;
                }
                let is_value = !matches!(self.stack.last(), Some(Frame::Map(_, None, _)));
                let v = if style == TScalarStyle::Plain {
                    if is_value && is_yaml11_bool_word(&text) {
                        let mut key = self.path();
                        if let Some(k) = self.child_key() {
                            key = if key.is_empty() {
                                k
                            } else {
                                format!("{key}.{k}")
                            };
                        }
                        self.ambiguous.push(Ambiguous {
                            key: key.replace(".[", "["),
                            text: text.clone(),
                            line: mark.line(),
                        });
                    }
                    if is_value {
                        plain_scalar(&text)
                    } else {
                        Value::String(text)
                    }
                } else {
                    Value::String(text)
                };
                self.push_value(v, mark.line());
            }
            Event::MappingStart(..) | Event::SequenceStart(..) => {
                if let Some(k) = self.child_key() {
                    self.keys.push(k);
                } else if !self.stack.is_empty() {
                    self.keys.push("?".into());
                }
                self.stack.push(if matches!(ev, Event::MappingStart(..)) {
                    Frame::Map(Map::new(), None, HashMap::new())
                } else {
                    Frame::Seq(Vec::new())
                });
            }
            Event::MappingEnd | Event::SequenceEnd => {
                let v = match self.stack.pop() {
                    Some(Frame::Map(m, _, _)) => Value::Object(m),
                    Some(Frame::Seq(s)) => Value::Array(s),
                    None => return,
                };
                if !self.stack.is_empty() {
                    self.keys.pop();
                }
                self.push_value(v, mark.line());
            }
            Event::Alias(_) => {
                self.error = Some(YamlError::Unsupported {
                    line: mark.line(),
                    msg: "aliases are not supported in dsg config files".into(),
                });
            }
            _ => {}
        }
    }
}

/// Parses one YAML document into JSON-like values plus the ambiguous scalars.
pub fn load(text: &str) -> Result<(Value, Vec<Ambiguous>), YamlError> {
    let mut b = Builder {
        stack: Vec::new(),
        keys: Vec::new(),
        root: None,
        ambiguous: Vec::new(),
        error: None,
    };
    Parser::new_from_str(text)
        .load(&mut b, false)
        .map_err(|e| YamlError::Syntax(e.to_string()))?;
    if let Some(e) = b.error {
        return Err(e);
    }
    Ok((b.root.unwrap_or(Value::Null), b.ambiguous))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn typing_and_ambiguity() {
        let (v, amb) =
            load("name: no\nok: \"no\"\nflag: true\nn: 3\nlist: [input, yes]\nrepo:\n  host: on\n")
                .unwrap();
        assert_eq!(v["name"], "no");
        assert_eq!(v["ok"], "no");
        assert_eq!(v["flag"], true);
        assert_eq!(v["n"], 3);
        let keys: Vec<_> = amb.iter().map(|a| a.key.as_str()).collect();
        assert_eq!(keys, ["name", "list[1]", "repo.host"]);
        assert_eq!(amb[0].line, 1);
    }

    #[test]
    fn duplicate_keys_are_errors() {
        let e = load("a: 1\nb:\n  c: 2\n  c: 3\n").unwrap_err();
        assert!(
            matches!(&e, YamlError::Duplicate { key, line: 4, first: 3 } if key == "b.c"),
            "{e:?}"
        );
        let e = load("l:\n  - {x: 1, x: 2}\n").unwrap_err().to_string();
        assert_eq!(e, "line 2: duplicate key 'l[0].x' (first at line 2)");
        // Equal keys in different mappings are not duplicates.
        load("a: {x: 1}\nb: {x: 1}\nl: [{x: 1}, {x: 2}]\n").unwrap();
    }

    #[test]
    fn syntax_error_is_reported() {
        assert!(load("a: [1, 2\n").is_err());
        assert!(load("a: &x 1\nb: *x\n").is_err());
    }
}
