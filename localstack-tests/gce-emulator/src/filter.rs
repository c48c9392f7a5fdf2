//! The subset of GCE's list `filter` syntax the emulator understands:
//! comparisons `FIELD = VALUE`, `FIELD != VALUE` (exact) and `FIELD eq RE`,
//! `FIELD ne RE` (whole-string regular expressions made of literals, `.`
//! and `*`), each optionally in parentheses, joined by spaces or `AND`.
//! FIELD is a dotted path (`name`, `labels.cluster`). Anything else (OR,
//! `:`, `<`, richer regular expressions) is refused with a 400, so a caller
//! never silently gets an unfiltered list.

use serde_json::Value;

#[derive(Debug)]
pub struct Filter {
    terms: Vec<Term>,
}

#[derive(Debug)]
struct Term {
    path: Vec<String>,
    negate: bool,
    pattern: Pattern,
}

#[derive(Debug)]
enum Pattern {
    Exact(String),
    Regex(Vec<Atom>),
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Atom {
    Lit(char),
    Any,
    Star(Option<char>),
}

#[derive(Debug, PartialEq)]
enum Tok {
    Open,
    Close,
    Word(String),
    Quoted(String),
    Op(&'static str),
}

fn tokenize(s: &str) -> Result<Vec<Tok>, String> {
    let mut out = Vec::new();
    let mut chars = s.chars().peekable();
    while let Some(&c) = chars.peek() {
        match c {
            c if c.is_whitespace() => {
                chars.next();
            }
            '(' => {
                chars.next();
                out.push(Tok::Open);
            }
            ')' => {
                chars.next();
                out.push(Tok::Close);
            }
            '=' => {
                chars.next();
                out.push(Tok::Op("="));
            }
            '!' => {
                chars.next();
                if chars.next() != Some('=') {
                    return Err("'!' must be followed by '='".into());
                }
                out.push(Tok::Op("!="));
            }
            '"' | '\'' => {
                chars.next();
                let mut v = String::new();
                loop {
                    match chars.next() {
                        Some('\\') => match chars.next() {
                            Some(e) => {
                                v.push('\\');
                                v.push(e);
                            }
                            None => return Err("unterminated string".into()),
                        },
                        Some(q) if q == c => break,
                        Some(o) => v.push(o),
                        None => return Err("unterminated string".into()),
                    }
                }
                out.push(Tok::Quoted(v));
            }
            ':' | '<' | '>' | '~' => return Err(format!("operator {c:?} is not supported")),
            _ => {
                let mut w = String::new();
                while let Some(&c) = chars.peek() {
                    if c.is_whitespace() || "()=!\"'".contains(c) {
                        break;
                    }
                    w.push(c);
                    chars.next();
                }
                match w.as_str() {
                    "eq" => out.push(Tok::Op("eq")),
                    "ne" => out.push(Tok::Op("ne")),
                    _ => out.push(Tok::Word(w)),
                }
            }
        }
    }
    Ok(out)
}

/// Backslash escapes of exact values (`\"`) become the character.
fn unescape(s: &str) -> String {
    let mut out = String::new();
    let mut it = s.chars();
    while let Some(c) = it.next() {
        if c == '\\' {
            if let Some(n) = it.next() {
                out.push(n);
            }
        } else {
            out.push(c);
        }
    }
    out
}

fn compile_regex(re: &str) -> Result<Vec<Atom>, String> {
    let mut atoms: Vec<Atom> = Vec::new();
    let mut it = re.chars();
    while let Some(c) = it.next() {
        let atom = match c {
            '\\' => Atom::Lit(it.next().ok_or("regular expression ends in '\\'")?),
            '.' => Atom::Any,
            '*' => {
                let prev = atoms.pop().ok_or("'*' without a preceding character")?;
                match prev {
                    Atom::Any => Atom::Star(None),
                    Atom::Lit(l) => Atom::Star(Some(l)),
                    Atom::Star(_) => return Err("'**' is not a regular expression".into()),
                }
            }
            '[' | ']' | '(' | ')' | '|' | '+' | '?' | '^' | '$' | '{' | '}' => {
                return Err(format!(
                    "{c:?} in a filter regular expression is not supported by the emulator"
                ));
            }
            c => Atom::Lit(c),
        };
        atoms.push(atom);
    }
    Ok(atoms)
}

fn regex_match(atoms: &[Atom], s: &[char]) -> bool {
    match atoms.split_first() {
        None => s.is_empty(),
        Some((Atom::Star(c), rest)) => {
            let mut i = 0;
            loop {
                if regex_match(rest, &s[i..]) {
                    return true;
                }
                match s.get(i) {
                    Some(ch) if c.is_none_or(|c| c == *ch) => i += 1,
                    _ => return false,
                }
            }
        }
        Some((a, rest)) => match s.split_first() {
            Some((ch, srest)) => {
                let ok = match a {
                    Atom::Any => true,
                    Atom::Lit(l) => l == ch,
                    Atom::Star(_) => false,
                };
                ok && regex_match(rest, srest)
            }
            None => false,
        },
    }
}

impl Filter {
    pub fn parse(s: &str) -> Result<Filter, String> {
        let toks = tokenize(s)?;
        let mut terms = Vec::new();
        let mut depth = 0i32;
        let mut i = 0;
        while i < toks.len() {
            match &toks[i] {
                Tok::Open => {
                    depth += 1;
                    i += 1;
                }
                Tok::Close => {
                    depth -= 1;
                    if depth < 0 {
                        return Err("unbalanced ')'".into());
                    }
                    i += 1;
                }
                Tok::Word(w) if w == "AND" => i += 1,
                Tok::Word(w) if w == "OR" || w == "NOT" => {
                    return Err(format!("{w} is not supported by the emulator"));
                }
                Tok::Word(field) => {
                    let op = match toks.get(i + 1) {
                        Some(Tok::Op(op)) => *op,
                        _ => return Err(format!("expected an operator after {field:?}")),
                    };
                    let value = match toks.get(i + 2) {
                        Some(Tok::Word(v)) | Some(Tok::Quoted(v)) => v.clone(),
                        _ => return Err(format!("expected a value after {field} {op}")),
                    };
                    // Named, since a filter may hold several expressions.
                    let regex = || {
                        compile_regex(&value).map_err(|e| format!("{field} {op} {value:?}: {e}"))
                    };
                    let (negate, pattern) = match op {
                        "=" => (false, Pattern::Exact(unescape(&value))),
                        "!=" => (true, Pattern::Exact(unescape(&value))),
                        "eq" => (false, Pattern::Regex(regex()?)),
                        _ => (true, Pattern::Regex(regex()?)),
                    };
                    terms.push(Term {
                        path: field.split('.').map(str::to_string).collect(),
                        negate,
                        pattern,
                    });
                    i += 3;
                }
                t => return Err(format!("unexpected {t:?}")),
            }
        }
        if depth != 0 {
            return Err("unbalanced '('".into());
        }
        Ok(Filter { terms })
    }

    pub fn matches(&self, v: &Value) -> bool {
        self.terms.iter().all(|t| {
            let mut cur = Some(v);
            for p in &t.path {
                cur = cur.and_then(|c| c.get(p));
            }
            let s = match cur {
                Some(Value::String(s)) => Some(s.clone()),
                Some(Value::Number(n)) => Some(n.to_string()),
                Some(Value::Bool(b)) => Some(b.to_string()),
                _ => None,
            };
            let hit = match (&t.pattern, s) {
                (_, None) => false,
                (Pattern::Exact(e), Some(s)) => *e == s,
                (Pattern::Regex(re), Some(s)) => {
                    let chars: Vec<char> = s.chars().collect();
                    regex_match(re, &chars)
                }
            };
            hit != t.negate
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn filters() {
        let v = json!({"name": "cnlb-abc-80", "labels": {"cluster": "c1"}, "port": 80});
        let ok = |f: &str| Filter::parse(f).unwrap().matches(&v);
        assert!(ok("name = cnlb-abc-80"));
        assert!(ok("name = \"cnlb-abc-80\""));
        assert!(!ok("name != cnlb-abc-80"));
        assert!(ok("name eq cnlb-.*"));
        assert!(ok("name eq 'cnlb-a.c-8*0'"));
        assert!(!ok("name eq cnlb-"));
        assert!(ok("name ne other.*"));
        assert!(ok("(name eq cnlb-.*) (labels.cluster = c1)"));
        assert!(ok("(name eq cnlb-.*) AND (labels.cluster = c1)"));
        assert!(!ok("labels.cluster = c2"));
        assert!(!ok("labels.missing = c1"));
        assert!(ok("labels.missing != c1"));
        assert!(ok("port = 80"));
        assert!(Filter::parse("a = 1 OR b = 2").is_err());
        assert!(Filter::parse("name eq (a|b)").is_err());
        assert!(Filter::parse("name : x").is_err());
    }
}

#[cfg(test)]
mod properties;
