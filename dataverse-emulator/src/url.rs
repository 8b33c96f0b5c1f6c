//! OData URL parsing for the emulator: resource paths with key predicates, literals, query options, the simple
//! `$filter` subset, and `Prefer` headers.
//!
//! The path is percent-decoded once, then parsed with a tokenizer that knows string literals, so key values may
//! contain `,`, `=`, `)`, `/`, `?`, `&` and doubled quotes.

use std::collections::HashMap;

use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, percent_decode_str, utf8_percent_encode};
use uuid::Uuid;

/// An OData primitive literal.
#[derive(Clone, Debug, PartialEq)]
pub(crate) enum Literal {
    Str(String),
    Int(i64),
    Guid(Uuid),
    Null,
    /// Decimals and booleans, by their text.
    Other(String),
}

impl Literal {
    pub(crate) fn to_json(&self) -> serde_json::Value {
        match self {
            Literal::Str(s) => serde_json::Value::String(s.clone()),
            Literal::Int(i) => serde_json::Value::from(*i),
            Literal::Guid(g) => serde_json::Value::String(g.to_string()),
            Literal::Null => serde_json::Value::Null,
            Literal::Other(text) => serde_json::from_str(text)
                .unwrap_or_else(|_| serde_json::Value::String(text.clone())),
        }
    }

    /// The literal as it appears in a URL (strings quoted, quotes doubled, then percent-encoded).
    pub(crate) fn encode(&self) -> String {
        match self {
            Literal::Str(s) => format!(
                "'{}'",
                utf8_percent_encode(&s.replace('\'', "''"), UNRESERVED)
            ),
            Literal::Int(i) => i.to_string(),
            Literal::Guid(g) => g.to_string(),
            Literal::Null => "null".to_owned(),
            Literal::Other(text) => text.clone(),
        }
    }
}

/// RFC 3986 unreserved; everything else is escaped inside key literals (as the client does).
const UNRESERVED: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

/// Characters escaped in query option values of generated links: keeps them readable (`$select=a,b`) while
/// escaping spaces, quotes, `&`, `#`, `%`, `+` and non-ASCII.
const QUERY_VALUE: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~')
    .remove(b',')
    .remove(b'$')
    .remove(b'(')
    .remove(b')')
    .remove(b'/')
    .remove(b':')
    .remove(b'@')
    .remove(b'=');

pub(crate) fn encode_query_value(value: &str) -> String {
    utf8_percent_encode(value, QUERY_VALUE).to_string()
}

/// A key predicate: `(<guid>)` or `(name=value,...)`.
#[derive(Clone, Debug, PartialEq)]
pub(crate) enum KeyPredicate {
    Bare(Literal),
    Named(Vec<(String, Literal)>),
}

impl KeyPredicate {
    /// The predicate as it appears in a URL, parentheses included.
    pub(crate) fn encode(&self) -> String {
        match self {
            KeyPredicate::Bare(literal) => format!("({})", literal.encode()),
            KeyPredicate::Named(pairs) => {
                let parts: Vec<String> = pairs
                    .iter()
                    .map(|(n, v)| format!("{n}={}", v.encode()))
                    .collect();
                format!("({})", parts.join(","))
            }
        }
    }
}

/// A resource path relative to the service root: `accounts`, `accounts(...)`, `accounts(...)/name`,
/// `accounts/Microsoft.Dynamics.CRM.CreateMultiple`.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct ResourcePath {
    pub(crate) segment: String,
    pub(crate) key: Option<KeyPredicate>,
    /// Further segments.
    pub(crate) rest: Vec<String>,
}

/// A character cursor over a decoded path or filter expression.
struct Cursor<'a> {
    text: &'a str,
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn new(text: &'a str) -> Self {
        Cursor { text, pos: 0 }
    }

    fn rest(&self) -> &'a str {
        &self.text[self.pos..]
    }

    fn peek(&self) -> Option<char> {
        self.rest().chars().next()
    }

    fn eat(&mut self, c: char) -> bool {
        if self.peek() == Some(c) {
            self.pos += c.len_utf8();
            true
        } else {
            false
        }
    }

    fn skip_spaces(&mut self) {
        while self.peek() == Some(' ') {
            self.pos += 1;
        }
    }

    fn take_while(&mut self, f: impl Fn(char) -> bool) -> &'a str {
        let start = self.pos;
        while let Some(c) = self.peek() {
            if !f(c) {
                break;
            }
            self.pos += c.len_utf8();
        }
        &self.text[start..self.pos]
    }

    fn identifier(&mut self) -> &'a str {
        self.take_while(|c| c.is_ascii_alphanumeric() || c == '_')
    }

    /// A literal: `'text'` (with `''` for a quote), a GUID, an integer, a decimal, `true`, `false` or `null`.
    fn literal(&mut self) -> Result<Literal, String> {
        if self.eat('\'') {
            let mut value = String::new();
            loop {
                let chunk = self.take_while(|c| c != '\'');
                value.push_str(chunk);
                if !self.eat('\'') {
                    return Err("a string literal has no closing quote".to_owned());
                }
                if self.eat('\'') {
                    value.push('\'');
                } else {
                    return Ok(Literal::Str(value));
                }
            }
        }
        let word =
            self.take_while(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.' || c == '+');
        if word.len() == 36
            && let Ok(g) = Uuid::parse_str(word)
        {
            return Ok(Literal::Guid(g));
        }
        if let Ok(i) = word.parse::<i64>() {
            return Ok(Literal::Int(i));
        }
        match word {
            "null" => Ok(Literal::Null),
            "true" | "false" => Ok(Literal::Other(word.to_owned())),
            _ if !word.is_empty() && word.parse::<f64>().is_ok() => {
                Ok(Literal::Other(word.to_owned()))
            }
            "" => Err(format!("expected a literal at '{}'", shorten(self.rest()))),
            _ => Err(format!("'{}' is not a valid literal", shorten(word))),
        }
    }
}

fn shorten(text: &str) -> String {
    text.chars().take(60).collect()
}

/// Percent-decodes once.
pub(crate) fn decode(text: &str) -> Result<String, String> {
    percent_decode_str(text)
        .decode_utf8()
        .map(|s| s.into_owned())
        .map_err(|_| format!("'{}' is not UTF-8 after percent-decoding", shorten(text)))
}

/// Parses a percent-encoded resource path (relative to the service root).
pub(crate) fn parse_path(raw: &str) -> Result<ResourcePath, String> {
    let decoded = decode(raw)?;
    let mut cur = Cursor::new(&decoded);
    let segment = cur.take_while(|c| c != '(' && c != '/').to_owned();
    let key = if cur.eat('(') {
        Some(key_predicate(&mut cur)?)
    } else {
        None
    };
    let rest = match cur.rest() {
        "" => Vec::new(),
        tail => match tail.strip_prefix('/') {
            Some(tail) => tail.split('/').map(str::to_owned).collect(),
            None => return Err(format!("unexpected '{}' after the key", shorten(tail))),
        },
    };
    Ok(ResourcePath { segment, key, rest })
}

/// The inside of `( ... )` after the opening parenthesis, consuming the closing one.
fn key_predicate(cur: &mut Cursor<'_>) -> Result<KeyPredicate, String> {
    cur.skip_spaces();
    if cur.eat(')') {
        // `WhoAmI()`-style empty parentheses.
        return Ok(KeyPredicate::Named(Vec::new()));
    }
    let start = cur.pos;
    let name = cur.identifier();
    cur.skip_spaces();
    let predicate = if !name.is_empty() && cur.eat('=') {
        let mut pairs = vec![(name.to_owned(), {
            cur.skip_spaces();
            cur.literal()?
        })];
        loop {
            cur.skip_spaces();
            if !cur.eat(',') {
                break;
            }
            cur.skip_spaces();
            let name = cur.identifier().to_owned();
            cur.skip_spaces();
            if name.is_empty() || !cur.eat('=') {
                return Err("a key predicate part is not 'name=value'".to_owned());
            }
            cur.skip_spaces();
            pairs.push((name, cur.literal()?));
        }
        KeyPredicate::Named(pairs)
    } else {
        cur.pos = start;
        KeyPredicate::Bare(cur.literal()?)
    };
    cur.skip_spaces();
    if !cur.eat(')') {
        return Err(format!(
            "the key predicate is not closed at '{}'",
            shorten(cur.rest())
        ));
    }
    Ok(predicate)
}

/// Query options of one request (system options decoded, parameter aliases kept).
#[derive(Clone, Debug, Default)]
pub(crate) struct Query {
    pub(crate) select: Option<Vec<String>>,
    pub(crate) filter: Option<String>,
    pub(crate) top: Option<usize>,
    pub(crate) skip: Option<String>,
    pub(crate) skiptoken: Option<String>,
    pub(crate) deltatoken: Option<String>,
    pub(crate) expand: Option<String>,
    pub(crate) orderby: Option<String>,
    pub(crate) count: bool,
    pub(crate) aliases: HashMap<String, String>,
    /// Other system options (`$apply`, `$search`, ...), by name.
    pub(crate) unsupported: Vec<String>,
}

pub(crate) fn parse_query(raw: Option<&str>) -> Result<Query, String> {
    let mut q = Query::default();
    let Some(raw) = raw else {
        return Ok(q);
    };
    for pair in raw.split('&').filter(|p| !p.is_empty()) {
        let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
        let name = decode(name)?;
        let value = decode(value)?;
        match name.as_str() {
            "$select" => {
                let columns: Vec<String> = value
                    .split(',')
                    .map(|c| c.trim().to_owned())
                    .filter(|c| !c.is_empty())
                    .collect();
                if columns.is_empty() {
                    return Err("$select is empty".to_owned());
                }
                q.select = Some(columns);
            }
            "$filter" => q.filter = Some(value),
            "$top" => {
                q.top = Some(value.trim().parse().map_err(|_| {
                    format!("$top '{}' is not a non-negative integer", shorten(&value))
                })?)
            }
            "$skip" => q.skip = Some(value),
            "$skiptoken" => q.skiptoken = Some(value),
            "$deltatoken" => q.deltatoken = Some(value),
            "$expand" => q.expand = Some(value),
            "$orderby" => q.orderby = Some(value),
            "$count" => q.count = value.eq_ignore_ascii_case("true"),
            _ if name.starts_with('@') => {
                q.aliases.insert(name, value);
            }
            _ if name.starts_with('$') => q.unsupported.push(name),
            // `tag` and other custom parameters are accepted and ignored.
            _ => {}
        }
    }
    Ok(q)
}

/// One condition of the supported `$filter` subset: `<path> eq|ne <literal or @alias>`.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct Condition {
    pub(crate) column: String,
    pub(crate) negate: bool,
    pub(crate) value: Literal,
}

/// Parses `cond and cond and ...`; anything else is an error naming the unsupported part.
pub(crate) fn parse_filter(
    text: &str,
    aliases: &HashMap<String, String>,
) -> Result<Vec<Condition>, String> {
    let mut cur = Cursor::new(text);
    let mut conditions = Vec::new();
    loop {
        cur.skip_spaces();
        let column = cur
            .take_while(|c| c.is_ascii_alphanumeric() || c == '_' || c == '/')
            .to_owned();
        if column.is_empty() {
            return Err(unsupported_filter(text));
        }
        cur.skip_spaces();
        let op = cur.identifier().to_ascii_lowercase();
        let negate = match op.as_str() {
            "eq" => false,
            "ne" => true,
            _ => return Err(unsupported_filter(text)),
        };
        cur.skip_spaces();
        let value = if cur.eat('@') {
            let alias = format!("@{}", cur.identifier());
            let raw = aliases
                .get(&alias)
                .ok_or_else(|| format!("the parameter alias '{alias}' has no value"))?;
            let mut alias_cur = Cursor::new(raw.trim());
            let value = alias_cur.literal()?;
            if !alias_cur.rest().trim().is_empty() {
                return Err(format!("the value of '{alias}' is not one literal"));
            }
            value
        } else {
            cur.literal().map_err(|_| unsupported_filter(text))?
        };
        conditions.push(Condition {
            column,
            negate,
            value,
        });
        cur.skip_spaces();
        if cur.rest().is_empty() {
            return Ok(conditions);
        }
        if !cur.identifier().eq_ignore_ascii_case("and") || cur.peek() != Some(' ') {
            return Err(unsupported_filter(text));
        }
    }
}

fn unsupported_filter(text: &str) -> String {
    format!(
        "The emulator supports only $filter expressions of the form \"column eq value [and column eq value ...]\" (eq or ne; string, integer, GUID or null values): '{}'",
        shorten(text)
    )
}

/// Splits a comma-separated list at top-level commas (not inside parentheses or quotes).
pub(crate) fn split_top_level(text: &str) -> Vec<&str> {
    let mut parts = Vec::new();
    let mut depth = 0usize;
    let mut quoted = false;
    let mut start = 0;
    for (i, c) in text.char_indices() {
        match c {
            '\'' | '"' => quoted = !quoted,
            '(' if !quoted => depth += 1,
            ')' if !quoted => depth = depth.saturating_sub(1),
            ',' if !quoted && depth == 0 => {
                parts.push(text[start..i].trim());
                start = i + 1;
            }
            _ => {}
        }
    }
    parts.push(text[start..].trim());
    parts.retain(|p| !p.is_empty());
    parts
}

/// The `Prefer` preferences the emulator acts on.
#[derive(Clone, Debug, Default, PartialEq)]
pub(crate) struct Prefs {
    pub(crate) return_representation: bool,
    pub(crate) maxpagesize: Option<usize>,
    pub(crate) track_changes: bool,
    pub(crate) continue_on_error: bool,
    pub(crate) include_annotations: bool,
}

impl Prefs {
    /// Parses one or more `Prefer` header values.
    pub(crate) fn parse<'a>(values: impl IntoIterator<Item = &'a str>) -> Prefs {
        let mut prefs = Prefs::default();
        for value in values {
            for pref in split_top_level(value) {
                let (name, arg) = pref.split_once('=').unwrap_or((pref, ""));
                match name.trim().to_ascii_lowercase().as_str() {
                    "return" => prefs.return_representation = arg.trim() == "representation",
                    "odata.maxpagesize" => prefs.maxpagesize = arg.trim().parse().ok(),
                    "odata.track-changes" => prefs.track_changes = true,
                    "odata.continue-on-error" => prefs.continue_on_error = true,
                    "odata.include-annotations" => prefs.include_annotations = true,
                    _ => {}
                }
            }
        }
        prefs
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_with_hostile_key_values() {
        // What odata::key_segment produces for `O'Brien & Co/1?`.
        let p = parse_path("accounts(accountnumber='O%27%27Brien%20%26%20Co%2F1%3F')").unwrap();
        assert_eq!(p.segment, "accounts");
        assert_eq!(
            p.key,
            Some(KeyPredicate::Named(vec![(
                "accountnumber".into(),
                Literal::Str("O'Brien & Co/1?".into())
            )]))
        );
        assert!(p.rest.is_empty());
        assert_eq!(
            p.key.unwrap().encode(),
            "(accountnumber='O%27%27Brien%20%26%20Co%2F1%3F')"
        );
        let p =
            parse_path("contacts(emailaddress1='a,b=c)''',new_externalid=-7)/fullname").unwrap();
        assert_eq!(
            p.key,
            Some(KeyPredicate::Named(vec![
                ("emailaddress1".into(), Literal::Str("a,b=c)'".into())),
                ("new_externalid".into(), Literal::Int(-7)),
            ]))
        );
        assert_eq!(p.rest, vec!["fullname".to_owned()]);
        let g = Uuid::from_u128(5);
        let p = parse_path(&format!("accounts({g})")).unwrap();
        assert_eq!(p.key, Some(KeyPredicate::Bare(Literal::Guid(g))));
        let p = parse_path("accounts/Microsoft.Dynamics.CRM.CreateMultiple").unwrap();
        assert_eq!(
            p.rest,
            vec!["Microsoft.Dynamics.CRM.CreateMultiple".to_owned()]
        );
        assert_eq!(
            parse_path("WhoAmI()").unwrap().key,
            Some(KeyPredicate::Named(vec![]))
        );
        for bad in [
            "accounts('x",
            "accounts(a=)",
            "accounts(a='x'",
            "accounts(a='x')b",
            "accounts(%FF)",
            "accounts(a=1,)",
        ] {
            assert!(parse_path(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn queries_and_filters() {
        let q = parse_query(Some(
            "$select=name,accountid&$filter=name%20eq%20'a%26b'&@t='account'&tag=x&$top=3&$count=true",
        ))
        .unwrap();
        assert_eq!(
            q.select,
            Some(vec!["name".to_owned(), "accountid".to_owned()])
        );
        assert_eq!(q.filter.as_deref(), Some("name eq 'a&b'"));
        assert_eq!(q.top, Some(3));
        assert!(q.count);
        let conditions = parse_filter(
            "sdkmessageid/name eq 'X' and primaryobjecttypecode eq @t",
            &q.aliases,
        )
        .unwrap();
        assert_eq!(conditions[0].column, "sdkmessageid/name");
        assert_eq!(conditions[1].value, Literal::Str("account".into()));
        assert!(parse_filter("a eq 1 or b eq 2", &q.aliases).is_err());
        assert!(parse_filter("contains(a,'x')", &q.aliases).is_err());
        assert!(parse_filter("a gt 1", &q.aliases).is_err());
        assert!(parse_filter("a eq @missing", &q.aliases).is_err());
        assert!(parse_filter("a ne null", &q.aliases).unwrap()[0].negate);
        assert!(parse_query(Some("$top=x")).is_err());
    }

    #[test]
    fn prefer_values() {
        let p = Prefs::parse([
            "odata.maxpagesize=2,odata.include-annotations=\"a,b\"",
            "return=representation",
        ]);
        assert_eq!(p.maxpagesize, Some(2));
        assert!(p.include_annotations && p.return_representation && !p.track_changes);
    }
}
