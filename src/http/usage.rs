//! `GET /admin/usage`: metered usage, totalled and grouped, as JSON.
//!
//! `since`/`until` take RFC 3339, a UTC date or Unix seconds (default: the
//! current month so far); `key` and `model` filter; `group_by` is a comma
//! list of `key`, `model`, `endpoint`, `day`, `status`.

use axum::extract::{Query, State};
use axum::Json;
use serde::{Deserialize, Serialize};

use super::error::ApiError;
use super::AppState;
use crate::tenancy::{self, Period, UsageQuery, UsageRow};

/// The query string.
#[derive(Debug, Deserialize)]
pub struct Params {
    since: Option<String>,
    until: Option<String>,
    key: Option<String>,
    model: Option<String>,
    group_by: Option<String>,
}

#[derive(Serialize)]
pub struct Report {
    object: &'static str,
    since: String,
    until: Option<String>,
    group_by: Vec<String>,
    data: Vec<UsageRow>,
}

fn time(param: &str, value: Option<&str>) -> Result<Option<i64>, ApiError> {
    value
        .map(|v| tenancy::parse_time(v).map_err(|e| ApiError::invalid(param, e)))
        .transpose()
}

/// Turns the query string into a store query.
pub fn query(p: &Params) -> Result<UsageQuery, ApiError> {
    let since = time("since", p.since.as_deref())?
        .unwrap_or_else(|| Period::Month.bounds(tenancy::now_ms()).0);
    let q = UsageQuery {
        since_ms: Some(since),
        until_ms: time("until", p.until.as_deref())?,
        key: p.key.clone(),
        model: p.model.clone(),
        group_by: p
            .group_by
            .as_deref()
            .unwrap_or("")
            .split(',')
            .map(str::trim)
            .filter(|g| !g.is_empty())
            .map(str::to_string)
            .collect(),
    };
    q.check().map_err(|e| ApiError::invalid("group_by", e))?;
    Ok(q)
}

/// The handler.
pub async fn report(
    State(state): State<AppState>,
    Query(p): Query<Params>,
) -> Result<Json<Report>, ApiError> {
    let q = query(&p)?;
    let usage = state.tenancy.usage().ok_or_else(|| {
        ApiError::invalid("usage", "usage metering is off (`[usage] enabled = false`)")
    })?;
    let data = usage
        .query(q.clone())
        .await
        .map_err(|e| ApiError::unavailable_because("the usage store", e))?;
    Ok(Json(Report {
        object: "list",
        since: tenancy::rfc3339(q.since_ms.unwrap_or(0)),
        until: q.until_ms.map(tenancy::rfc3339),
        group_by: q.group_by,
        data,
    }))
}
