//! Property tests of the list `filter` parser: any text parses or is
//! refused without a panic, a bad term is refused naming its field (a bad
//! token naming the token), and valid filters, written in GCE's syntax,
//! parse to the terms they were written from and match the objects they
//! describe. In-crate for the parsed terms, which are private.
//!
//! `PROPTEST_CASES` sets the cases per property (`make fuzz` raises it).

use std::cell::Cell;
use std::fmt::Debug;

use proptest::collection::vec;
use proptest::option;
use proptest::prelude::*;
use proptest::sample::select;
use proptest::test_runner::{TestCaseResult, TestRunner};
use serde_json::{Map, Value, json};

use super::*;

/// Runs `test` on inputs of `strategy` with proptest's default config (so
/// `PROPTEST_CASES` applies) and prints the number of cases run, which
/// `make fuzz` reports. No regression files: a failure prints its minimal
/// input, which then belongs in the unit tests.
fn check<S>(name: &str, strategy: S, test: impl Fn(S::Value) -> TestCaseResult)
where
    S: Strategy,
    S::Value: Debug,
{
    let config = ProptestConfig {
        failure_persistence: None,
        ..ProptestConfig::default()
    };
    let cases = Cell::new(0u64);
    let result = TestRunner::new(config).run(&strategy, |value| {
        cases.set(cases.get() + 1);
        test(value)
    });
    eprintln!("properties: {name}: {} cases", cases.get());
    if let Err(err) = result {
        panic!("{name}: {err}");
    }
}

// ------------------------------------------------------------ any text

/// Filter text from the syntax's own tokens, so that most of it gets past
/// the tokenizer, or any text at all.
fn any_filter() -> impl Strategy<Value = String> {
    let token = select(
        &[
            "name",
            "labels.cluster",
            "port",
            "=",
            "!=",
            "eq",
            "ne",
            "AND",
            "OR",
            "NOT",
            "(",
            ")",
            "\"",
            "'",
            "\\",
            "a",
            "cnlb-.*",
            ".",
            "*",
            "a*",
            "**",
            "[a]",
            "a|b",
            ":",
            "<",
            "!",
            "\"x y\"",
            "'x'",
            "80",
            "true",
            " ",
            "é",
        ][..],
    );
    prop_oneof![
        3 => vec(
            (token, select(&[" ", "", "  "][..])),
            0..12
        )
        .prop_map(|parts| parts.into_iter().flat_map(|(t, s)| [t, s]).collect::<String>()),
        1 => any::<String>(),
    ]
}

/// Objects with short values: the matcher backtracks on `*`, so long
/// strings against many stars would only measure its patience.
fn any_object() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        "[a-z*.-]{0,6}".prop_map(Value::from),
        any::<i16>().prop_map(Value::from),
        any::<bool>().prop_map(Value::from),
        Just(Value::Null),
    ];
    let labels = proptest::collection::btree_map("[a-z]{1,7}", leaf.clone(), 0..3)
        .prop_map(|m| Value::Object(m.into_iter().collect()));
    (leaf.clone(), leaf, option::of(labels)).prop_map(|(name, port, labels)| {
        let mut object = json!({ "name": name, "port": port });
        if let Some(labels) = labels {
            object["labels"] = labels;
        }
        object
    })
}

#[test]
fn any_filter_parses_or_is_refused() {
    check(
        "any_filter_parses_or_is_refused",
        (any_filter(), vec(any_object(), 0..3)),
        |(text, objects)| {
            match Filter::parse(&text) {
                Ok(filter) => {
                    for object in &objects {
                        filter.matches(object);
                    }
                }
                Err(err) => prop_assert!(!err.is_empty()),
            }
            Ok(())
        },
    );
}

// ------------------------------------------------------- valid filters

/// A field path, made unique by the term's index so that each term of a
/// filter has an object field of its own (and never a keyword).
fn path(index: usize) -> impl Strategy<Value = Vec<String>> {
    vec("[a-zA-Z][a-zA-Z0-9_-]{0,8}", 1..4).prop_map(move |mut segments| {
        segments[0] = format!("{}_{index}", segments[0]);
        segments
    })
}

/// Characters of values, with every one the syntax treats specially.
const ALPHABET: &[char] = &[
    'a', 'z', 'A', '0', '9', '-', '_', '/', ' ', '\t', 'é', '.', '*', '\\', '"', '\'', '(', ')',
    '[', ']', '{', '}', '|', '+', '?', '^', '$', '=', '!', ':', '<', '>', '~',
];

/// Characters with a meaning in a filter regular expression.
const REGEX_SPECIAL: &[char] = &[
    '\\', '.', '*', '[', ']', '(', ')', '{', '}', '|', '+', '?', '^', '$',
];

#[derive(Debug, Clone, PartialEq)]
enum WantedPattern {
    Exact(String),
    Regex(Vec<Atom>),
}

#[derive(Debug, Clone)]
struct WantedTerm {
    path: Vec<String>,
    negate: bool,
    pattern: WantedPattern,
    /// Written with `'` rather than `"`, or unquoted when it can be.
    single_quotes: bool,
    unquoted: bool,
    parentheses: usize,
}

fn atom() -> impl Strategy<Value = Atom> {
    prop_oneof![
        4 => select(ALPHABET).prop_map(Atom::Lit),
        1 => Just(Atom::Any),
        1 => option::of(select(ALPHABET)).prop_map(Atom::Star),
    ]
}

fn term(index: usize) -> impl Strategy<Value = WantedTerm> {
    let pattern = prop_oneof![
        vec(select(ALPHABET), 0..10)
            .prop_map(|chars| WantedPattern::Exact(chars.into_iter().collect())),
        vec(atom(), 0..8).prop_map(WantedPattern::Regex),
    ];
    (
        path(index),
        any::<bool>(),
        pattern,
        any::<bool>(),
        any::<bool>(),
        0..3usize,
    )
        .prop_map(
            |(path, negate, pattern, single_quotes, unquoted, parentheses)| WantedTerm {
                path,
                negate,
                pattern,
                single_quotes,
                unquoted,
                parentheses,
            },
        )
}

/// A word the tokenizer reads as one value.
fn is_bare_word(s: &str) -> bool {
    !s.is_empty()
        && s != "eq"
        && s != "ne"
        && !s.starts_with([':', '<', '>', '~'])
        && !s
            .chars()
            .any(|c| c.is_whitespace() || "()=!\"'".contains(c))
}

fn regex_text(atoms: &[Atom]) -> String {
    let literal = |c: char| {
        if REGEX_SPECIAL.contains(&c) {
            format!("\\{c}")
        } else {
            c.to_string()
        }
    };
    atoms
        .iter()
        .map(|atom| match atom {
            Atom::Lit(c) => literal(*c),
            Atom::Any => ".".to_owned(),
            Atom::Star(None) => ".*".to_owned(),
            Atom::Star(Some(c)) => format!("{}*", literal(*c)),
        })
        .collect()
}

/// One term as GCE's documentation writes it: `FIELD = "VALUE"`,
/// `FIELD ne RE`, in parentheses or not.
fn render_term(t: &WantedTerm) -> String {
    let (op, text, escape_backslash) = match (&t.pattern, t.negate) {
        (WantedPattern::Exact(value), false) => ("=", value.clone(), true),
        (WantedPattern::Exact(value), true) => ("!=", value.clone(), true),
        // Regular expressions escape their own backslashes.
        (WantedPattern::Regex(atoms), false) => ("eq", regex_text(atoms), false),
        (WantedPattern::Regex(atoms), true) => ("ne", regex_text(atoms), false),
    };
    let value = if t.unquoted && is_bare_word(&text) && !(escape_backslash && text.contains('\\')) {
        text
    } else {
        let quote = if t.single_quotes { '\'' } else { '"' };
        let mut quoted = String::from(quote);
        for c in text.chars() {
            if c == quote || (c == '\\' && escape_backslash) {
                quoted.push('\\');
            }
            quoted.push(c);
        }
        quoted.push(quote);
        quoted
    };
    let term = format!("{} {op} {value}", t.path.join("."));
    format!(
        "{}{term}{}",
        "(".repeat(t.parentheses),
        ")".repeat(t.parentheses)
    )
}

/// A value the term matches (`None`: the field is left out, which only
/// negated terms match).
fn witness(t: &WantedTerm) -> Option<String> {
    match (&t.pattern, t.negate) {
        (WantedPattern::Exact(value), false) => Some(value.clone()),
        (WantedPattern::Exact(value), true) => Some(format!("{value}#")),
        (WantedPattern::Regex(atoms), false) => Some(
            atoms
                .iter()
                .filter_map(|atom| match atom {
                    Atom::Lit(c) => Some(*c),
                    Atom::Any => Some('x'),
                    Atom::Star(_) => None,
                })
                .collect(),
        ),
        (WantedPattern::Regex(_), true) => None,
    }
}

fn set(object: &mut Map<String, Value>, path: &[String], value: String) {
    match path {
        [] => {}
        [last] => {
            object.insert(last.clone(), Value::String(value));
        }
        [first, rest @ ..] => {
            let inner = object
                .entry(first.clone())
                .or_insert_with(|| Value::Object(Map::new()));
            if let Value::Object(inner) = inner {
                set(inner, rest, value);
            }
        }
    }
}

fn terms() -> impl Strategy<Value = (Vec<WantedTerm>, bool)> {
    (1..5usize).prop_flat_map(|n| {
        let terms: Vec<_> = (0..n).map(term).collect();
        (terms, any::<bool>())
    })
}

fn parsed(filter: &Filter) -> Vec<(Vec<String>, bool, WantedPattern)> {
    filter
        .terms
        .iter()
        .map(|t| {
            let pattern = match &t.pattern {
                Pattern::Exact(s) => WantedPattern::Exact(s.clone()),
                Pattern::Regex(atoms) => WantedPattern::Regex(atoms.clone()),
            };
            (t.path.clone(), t.negate, pattern)
        })
        .collect()
}

#[test]
fn valid_filters_round_trip() {
    check("valid_filters_round_trip", terms(), |(terms, and)| {
        let joiner = if and { " AND " } else { " " };
        let text: Vec<String> = terms.iter().map(render_term).collect();
        let text = text.join(joiner);
        let filter = match Filter::parse(&text) {
            Ok(filter) => filter,
            Err(err) => return Err(TestCaseError::fail(format!("{text}: {err}"))),
        };
        let wanted: Vec<_> = terms
            .iter()
            .map(|t| (t.path.clone(), t.negate, t.pattern.clone()))
            .collect();
        prop_assert_eq!(parsed(&filter), wanted, "{}", text);

        // It matches what it describes, and not once a plain term's field is gone.
        let mut object = Map::new();
        for t in &terms {
            if let Some(value) = witness(t) {
                set(&mut object, &t.path, value);
            }
        }
        prop_assert!(filter.matches(&Value::Object(object.clone())), "{}", text);
        object.remove(&terms[0].path[0]);
        prop_assert_eq!(
            filter.matches(&Value::Object(object)),
            terms[0].negate,
            "{}",
            text
        );
        Ok(())
    });
}

// ---------------------------------------------------------- bad filters

/// A bad last term, and the text the error must contain: the term's field
/// when the term is at fault, else the token.
fn bad_term(field: String) -> impl Strategy<Value = (String, String)> {
    let unsupported = select(&["[", "]", "(", ")", "|", "+", "?", "^", "$", "{", "}"][..]);
    let bad_regex = prop_oneof![
        ("[a-z]{0,3}", unsupported, "[a-z]{0,3}").prop_map(|(a, bad, b)| format!("{a}{bad}{b}")),
        "[a-z]{0,3}".prop_map(|a| format!("*{a}")),
        "[a-z]{1,3}".prop_map(|a| format!("{a}**")),
    ];
    let (f1, f2, f3) = (field.clone(), field.clone(), field.clone());
    let at_field = prop_oneof![
        // No operator, or no value.
        Just(field.clone()),
        select(&["=", "!=", "eq", "ne"][..]).prop_map(move |op| format!("{f1} {op}")),
        // Regular expressions the emulator does not understand.
        (select(&["eq", "ne"][..]), bad_regex)
            .prop_map(move |(op, re)| format!("{f2} {op} \"{re}\"")),
    ]
    .prop_map(move |text| (text, f3.clone()));
    let (f1, f2) = (field.clone(), field.clone());
    let f = field;
    let at_token = prop_oneof![
        select(&[':', '<', '>', '~'][..])
            .prop_map(move |op| (format!("{f1} {op} x"), format!("{op:?}"))),
        Just((format!("{f} ! x"), "'!'".to_owned())),
        Just((format!("{f} = \"x"), "unterminated string".to_owned())),
        select(&["OR", "NOT"][..])
            .prop_map(move |word| (format!("{f2} = a {word} {f2} = b"), word.to_owned())),
        Just((format!("({f} = a"), "'('".to_owned())),
        Just((format!("{f} = a)"), "')'".to_owned())),
    ];
    prop_oneof![at_field, at_token]
}

#[test]
fn a_bad_filter_names_its_field_or_token() {
    let cases = (terms(), path(9))
        .prop_flat_map(|((good, _), bad_path)| (Just(good), bad_term(bad_path.join("."))));
    check(
        "a_bad_filter_names_its_field_or_token",
        cases,
        |(good, (bad, named))| {
            let mut text: Vec<String> = good.iter().map(render_term).collect();
            text.push(bad);
            let text = text.join(" ");
            match Filter::parse(&text) {
                Ok(filter) => Err(TestCaseError::fail(format!("{text}: accepted: {filter:?}"))),
                Err(err) => {
                    prop_assert!(
                        err.contains(&named),
                        "{}: {} does not name {}",
                        text,
                        err,
                        named
                    );
                    Ok(())
                }
            }
        },
    );
}
