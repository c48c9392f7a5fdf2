//! List calls: `maxResults`, page tokens and `filter`.

use serde_json::{Value, json};

use super::{MAX_PAGE, Result};
use crate::error::ApiError;
use crate::filter::Filter;

/// Optional query parameters of list calls.
#[derive(Default)]
pub struct ListQuery<'a> {
    pub filter: Option<&'a str>,
    pub max_results: Option<&'a str>,
    pub page_token: Option<&'a str>,
}

/// One page of a list: `maxResults` (default and at most 500), an opaque
/// `pageToken`, and `filter` (see `filter.rs`).
pub(super) fn list_page(
    items: Vec<Value>,
    q: &ListQuery,
    kind: &str,
    self_link: &str,
) -> Result<Value> {
    let items: Vec<Value> = match q.filter.filter(|f| !f.trim().is_empty()) {
        Some(f) => {
            let filter = Filter::parse(f).map_err(|e| {
                ApiError::invalid_field(
                    "filter",
                    f,
                    &format!("Invalid list filter expression: {e}."),
                )
            })?;
            items.into_iter().filter(|v| filter.matches(v)).collect()
        }
        None => items,
    };
    let max = match q.max_results {
        None => MAX_PAGE,
        Some(s) => match s.parse::<usize>() {
            Ok(0) => MAX_PAGE,
            Ok(n) if n <= MAX_PAGE => n,
            _ => {
                return Err(ApiError::invalid_field(
                    "maxResults",
                    s,
                    &format!("Must be between 0 and {MAX_PAGE}."),
                ));
            }
        },
    };
    let start = match q.page_token {
        None | Some("") => 0,
        Some(t) => t
            .strip_prefix("cnlb-page-")
            .and_then(|n| usize::from_str_radix(n, 16).ok())
            .filter(|n| *n <= items.len())
            .ok_or_else(|| ApiError::invalid_field("pageToken", t, "Invalid page token."))?,
    };
    let end = (start + max).min(items.len());
    let mut out = json!({
        "kind": kind,
        "id": self_link,
        "selfLink": self_link,
    });
    let page: Vec<Value> = items[start..end].to_vec();
    if !page.is_empty() {
        out["items"] = json!(page);
    }
    if end < items.len() {
        out["nextPageToken"] = json!(format!("cnlb-page-{end:x}"));
    }
    Ok(out)
}
