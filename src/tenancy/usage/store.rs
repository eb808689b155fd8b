//! The usage store: one schema, kept in SQLite (one box) or PostgreSQL
//! (replicas that lose their disk). Queries aggregate in SQL; only the
//! placeholder syntax and the day expression differ between the two.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use anyhow::{Context, Result};

use super::{UsageQuery, UsageRecord, UsageRow};
use crate::config::UsageTarget;

/// The table, the same in both databases.
pub const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS kindling_usage (
    ts_ms BIGINT NOT NULL,
    request_id TEXT NOT NULL,
    key_name TEXT NOT NULL,
    model TEXT NOT NULL,
    version TEXT,
    endpoint TEXT NOT NULL,
    status INTEGER NOT NULL,
    prompt_tokens BIGINT NOT NULL,
    completion_tokens BIGINT NOT NULL,
    cached_tokens BIGINT NOT NULL,
    embedding_tokens BIGINT NOT NULL,
    images BIGINT NOT NULL,
    pixel_steps DOUBLE PRECISION NOT NULL,
    compute_seconds DOUBLE PRECISION NOT NULL,
    queue_seconds DOUBLE PRECISION NOT NULL
);
CREATE INDEX IF NOT EXISTS kindling_usage_ts ON kindling_usage (ts_ms);
CREATE INDEX IF NOT EXISTS kindling_usage_key_ts ON kindling_usage (key_name, ts_ms);
";

const INSERT_COLUMNS: &str = "ts_ms, request_id, key_name, model, version, endpoint, status, \
prompt_tokens, completion_tokens, cached_tokens, embedding_tokens, images, pixel_steps, \
compute_seconds, queue_seconds";

/// Totals selected by every query, in [`UsageRow`] order.
const TOTALS: &str = "COUNT(*), CAST(SUM(prompt_tokens) AS BIGINT), \
CAST(SUM(completion_tokens) AS BIGINT), CAST(SUM(cached_tokens) AS BIGINT), \
CAST(SUM(embedding_tokens) AS BIGINT), CAST(SUM(images) AS BIGINT), SUM(pixel_steps), \
SUM(compute_seconds), SUM(queue_seconds)";

/// A usage database.
pub trait Store: Send {
    /// Commits `rows` in one transaction.
    fn insert(&mut self, rows: &[UsageRecord]) -> Result<()>;
    /// Aggregates per the query.
    fn query(&mut self, q: &UsageQuery) -> Result<Vec<UsageRow>>;
    /// Billable tokens per key since `since_ms`.
    fn token_totals(&mut self, since_ms: i64) -> Result<HashMap<String, u64>>;
}

/// Opens the store `target` names, creating the table if needed.
pub fn open(target: &UsageTarget) -> Result<Box<dyn Store>> {
    match target {
        UsageTarget::Sqlite(path) => Ok(Box::new(Sqlite::open(path)?)),
        UsageTarget::Postgres(url) => Ok(Box::new(Postgres::open(url)?)),
    }
}

/// A value bound to a placeholder.
enum Param {
    Int(i64),
    Text(String),
}

/// The SQL differences between the two databases.
struct Dialect {
    placeholder: fn(usize) -> String,
    day: &'static str,
}

const SQLITE: Dialect = Dialect {
    placeholder: |i| format!("?{i}"),
    day: "strftime('%Y-%m-%d', ts_ms / 1000, 'unixepoch')",
};

const POSTGRES: Dialect = Dialect {
    placeholder: |i| format!("${i}"),
    day: "to_char(to_timestamp(ts_ms / 1000.0) AT TIME ZONE 'UTC', 'YYYY-MM-DD')",
};

impl Dialect {
    fn insert_sql(&self) -> String {
        let marks: Vec<String> = (1..=15).map(self.placeholder).collect();
        format!(
            "INSERT INTO kindling_usage ({INSERT_COLUMNS}) VALUES ({})",
            marks.join(", ")
        )
    }

    fn column(&self, group: &str) -> String {
        match group {
            "key" => "key_name".into(),
            "day" => self.day.into(),
            "status" => "CAST(status AS TEXT)".into(),
            "version" => "COALESCE(version, '')".into(),
            // Checked against the allowed names before it gets here.
            other => other.into(),
        }
    }

    /// The aggregate query and its parameters.
    fn query_sql(&self, q: &UsageQuery) -> (String, Vec<Param>) {
        let mut filters = Vec::new();
        let mut params = Vec::new();
        let mut bind = |cond: &str, p: Param, params: &mut Vec<Param>| {
            params.push(p);
            filters.push(format!("{cond} {}", (self.placeholder)(params.len())));
        };
        if let Some(t) = q.since_ms {
            bind("ts_ms >=", Param::Int(t), &mut params);
        }
        if let Some(t) = q.until_ms {
            bind("ts_ms <", Param::Int(t), &mut params);
        }
        if let Some(k) = &q.key {
            bind("key_name =", Param::Text(k.clone()), &mut params);
        }
        if let Some(m) = &q.model {
            bind("model =", Param::Text(m.clone()), &mut params);
        }
        let groups: Vec<String> = q.group_by.iter().map(|g| self.column(g)).collect();
        let mut sql = String::from("SELECT ");
        for g in &groups {
            sql.push_str(g);
            sql.push_str(", ");
        }
        sql.push_str(TOTALS);
        sql.push_str(" FROM kindling_usage");
        if !filters.is_empty() {
            sql.push_str(" WHERE ");
            sql.push_str(&filters.join(" AND "));
        }
        if !groups.is_empty() {
            let by: Vec<String> = (1..=groups.len()).map(|i| i.to_string()).collect();
            sql.push_str(&format!(" GROUP BY {0} ORDER BY {0}", by.join(", ")));
        }
        (sql, params)
    }

    fn totals_sql(&self) -> String {
        format!(
            "SELECT key_name, CAST(SUM(prompt_tokens + completion_tokens + embedding_tokens) AS BIGINT) \
             FROM kindling_usage WHERE ts_ms >= {} GROUP BY key_name",
            (self.placeholder)(1)
        )
    }
}

/// A result row's columns by index, whichever database it came from (a
/// NULL sum, over no rows, reads as zero).
trait Columns {
    fn text(&self, i: usize) -> Result<Option<String>>;
    fn int(&self, i: usize) -> Result<Option<i64>>;
    fn float(&self, i: usize) -> Result<Option<f64>>;
}

impl Columns for rusqlite::Row<'_> {
    fn text(&self, i: usize) -> Result<Option<String>> {
        Ok(self.get(i)?)
    }
    fn int(&self, i: usize) -> Result<Option<i64>> {
        Ok(self.get(i)?)
    }
    fn float(&self, i: usize) -> Result<Option<f64>> {
        Ok(self.get(i)?)
    }
}

impl Columns for postgres::Row {
    fn text(&self, i: usize) -> Result<Option<String>> {
        Ok(self.try_get(i)?)
    }
    fn int(&self, i: usize) -> Result<Option<i64>> {
        Ok(self.try_get(i)?)
    }
    fn float(&self, i: usize) -> Result<Option<f64>> {
        Ok(self.try_get(i)?)
    }
}

/// Reads a query's row: the group's values, then the nine totals.
fn read_row(q: &UsageQuery, r: &impl Columns) -> Result<UsageRow> {
    let n = q.group_by.len();
    let mut group = BTreeMap::new();
    for (i, name) in q.group_by.iter().enumerate() {
        group.insert(name.clone(), r.text(i)?.unwrap_or_default());
    }
    let u =
        |i: usize| -> Result<u64> { Ok(u64::try_from(r.int(n + i)?.unwrap_or(0)).unwrap_or(0)) };
    let f = |i: usize| -> Result<f64> { Ok(r.float(n + 6 + i)?.unwrap_or(0.0)) };
    Ok(UsageRow {
        group,
        requests: u(0)?,
        prompt_tokens: u(1)?,
        completion_tokens: u(2)?,
        cached_tokens: u(3)?,
        embedding_tokens: u(4)?,
        images: u(5)?,
        pixel_steps: f(0)?,
        compute_seconds: f(1)?,
        queue_seconds: f(2)?,
    })
}

fn int(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// SQLite, in WAL mode: readers (`kindling usage`) never block the writer.
struct Sqlite(rusqlite::Connection);

/// How long opening waits for another process that holds the file (two
/// daemons sharing a store, `kindling usage` reading).
const OPEN_PATIENCE: std::time::Duration = std::time::Duration::from_secs(10);

fn is_busy(e: &rusqlite::Error) -> bool {
    matches!(
        e.sqlite_error_code(),
        Some(rusqlite::ErrorCode::DatabaseBusy | rusqlite::ErrorCode::DatabaseLocked)
    )
}

impl Sqlite {
    fn open(path: &Path) -> Result<Self> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)
                .with_context(|| format!("cannot create {}", dir.display()))?;
        }
        // Switching a new file to WAL does not wait on the busy handler:
        // retry while another connection holds it.
        let start = std::time::Instant::now();
        loop {
            match Self::connect(path) {
                Err(e) if is_busy(&e) && start.elapsed() < OPEN_PATIENCE => {
                    std::thread::sleep(std::time::Duration::from_millis(50));
                }
                other => {
                    return other
                        .map(Self)
                        .with_context(|| format!("cannot open usage database {}", path.display()))
                }
            }
        }
    }

    fn connect(path: &Path) -> rusqlite::Result<rusqlite::Connection> {
        let c = rusqlite::Connection::open(path)?;
        c.busy_timeout(std::time::Duration::from_secs(5))?;
        let mode: String = c.query_row("PRAGMA journal_mode", [], |r| r.get(0))?;
        if !mode.eq_ignore_ascii_case("wal") {
            c.pragma_update(None, "journal_mode", "WAL")?;
        }
        c.pragma_update(None, "synchronous", "NORMAL")?;
        c.execute_batch(SCHEMA)?;
        Ok(c)
    }
}

impl Store for Sqlite {
    fn insert(&mut self, rows: &[UsageRecord]) -> Result<()> {
        let tx = self.0.transaction()?;
        {
            let mut st = tx.prepare_cached(&SQLITE.insert_sql())?;
            for r in rows {
                st.execute(rusqlite::params![
                    r.ts_ms,
                    r.request_id,
                    r.key,
                    r.model,
                    r.version,
                    r.endpoint,
                    r.status,
                    int(r.prompt_tokens),
                    int(r.completion_tokens),
                    int(r.cached_tokens),
                    int(r.embedding_tokens),
                    int(r.images),
                    r.pixel_steps,
                    r.compute_seconds,
                    r.queue_seconds,
                ])?;
            }
        }
        tx.commit()?;
        Ok(())
    }

    fn query(&mut self, q: &UsageQuery) -> Result<Vec<UsageRow>> {
        let (sql, params) = SQLITE.query_sql(q);
        let params: Vec<Box<dyn rusqlite::ToSql>> = params
            .into_iter()
            .map(|p| -> Box<dyn rusqlite::ToSql> {
                match p {
                    Param::Int(i) => Box::new(i),
                    Param::Text(t) => Box::new(t),
                }
            })
            .collect();
        let mut st = self.0.prepare(&sql)?;
        let mut rows = st.query(rusqlite::params_from_iter(params.iter()))?;
        let mut out = Vec::new();
        while let Some(r) = rows.next()? {
            out.push(read_row(q, r)?);
        }
        // No rows at all: the ungrouped query still answers zeros.
        out.retain(|r| r.requests > 0);
        Ok(out)
    }

    fn token_totals(&mut self, since_ms: i64) -> Result<HashMap<String, u64>> {
        let mut st = self.0.prepare(&SQLITE.totals_sql())?;
        let rows = st.query_map([since_ms], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, Option<i64>>(1)?.unwrap_or(0),
            ))
        })?;
        rows.map(|r| Ok(r.map(|(k, v)| (k, u64::try_from(v).unwrap_or(0)))?))
            .collect()
    }
}

/// PostgreSQL, through a plain connection (no TLS: run it on a private
/// network or a local socket proxy).
struct Postgres(postgres::Client);

impl Postgres {
    fn open(url: &str) -> Result<Self> {
        let mut c = postgres::Client::connect(url, postgres::NoTls)
            .context("cannot connect to the usage database (usage.database_url)")?;
        c.batch_execute(SCHEMA)
            .context("cannot create the usage table in PostgreSQL")?;
        Ok(Self(c))
    }
}

impl Store for Postgres {
    fn insert(&mut self, rows: &[UsageRecord]) -> Result<()> {
        let mut tx = self.0.transaction()?;
        let st = tx.prepare(&POSTGRES.insert_sql())?;
        for r in rows {
            let status = i32::from(r.status);
            tx.execute(
                &st,
                &[
                    &r.ts_ms,
                    &r.request_id,
                    &r.key,
                    &r.model,
                    &r.version,
                    &r.endpoint,
                    &status,
                    &int(r.prompt_tokens),
                    &int(r.completion_tokens),
                    &int(r.cached_tokens),
                    &int(r.embedding_tokens),
                    &int(r.images),
                    &r.pixel_steps,
                    &r.compute_seconds,
                    &r.queue_seconds,
                ],
            )?;
        }
        tx.commit()?;
        Ok(())
    }

    fn query(&mut self, q: &UsageQuery) -> Result<Vec<UsageRow>> {
        let (sql, params) = POSTGRES.query_sql(q);
        let params: Vec<Box<dyn postgres::types::ToSql + Sync>> = params
            .into_iter()
            .map(|p| -> Box<dyn postgres::types::ToSql + Sync> {
                match p {
                    Param::Int(i) => Box::new(i),
                    Param::Text(t) => Box::new(t),
                }
            })
            .collect();
        let refs: Vec<&(dyn postgres::types::ToSql + Sync)> =
            params.iter().map(|p| p.as_ref()).collect();
        let mut out = Vec::new();
        for r in self.0.query(&sql, &refs)? {
            out.push(read_row(q, &r)?);
        }
        out.retain(|r| r.requests > 0);
        Ok(out)
    }

    fn token_totals(&mut self, since_ms: i64) -> Result<HashMap<String, u64>> {
        let rows = self.0.query(&POSTGRES.totals_sql(), &[&since_ms])?;
        rows.iter()
            .map(|r| {
                let v: Option<i64> = r.try_get(1)?;
                Ok((r.try_get(0)?, u64::try_from(v.unwrap_or(0)).unwrap_or(0)))
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(key: &str, tokens: u64, ts_ms: i64) -> UsageRecord {
        UsageRecord {
            ts_ms,
            request_id: "r".into(),
            key: key.into(),
            model: "m".into(),
            endpoint: "/v1/completions".into(),
            status: 200,
            prompt_tokens: tokens,
            completion_tokens: 1,
            ..UsageRecord::default()
        }
    }

    #[test]
    fn daemons_sharing_a_store_open_it_together_and_sums_group_by_day() {
        let dir = std::env::temp_dir().join(format!("kindling-usage-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let path = dir.join("usage.sqlite");
        let start = std::sync::Arc::new(std::sync::Barrier::new(16));
        let opened: Vec<_> = (0..16)
            .map(|_| {
                let (path, start) = (path.clone(), start.clone());
                std::thread::spawn(move || {
                    start.wait();
                    Sqlite::open(&path).map(|_| ())
                })
            })
            .collect();
        for t in opened {
            t.join().unwrap().unwrap();
        }
        let mut s = Sqlite::open(&path).unwrap();
        let day = 86_400_000;
        s.insert(&[
            record("a", 10, day),
            record("a", 5, 2 * day + 1),
            record("b", 7, day),
        ])
        .unwrap();
        let q = UsageQuery {
            group_by: vec!["key".into(), "day".into()],
            ..UsageQuery::default()
        };
        let rows = s.query(&q).unwrap();
        let got: Vec<(String, String, u64)> = rows
            .iter()
            .map(|r| {
                (
                    r.group["key"].clone(),
                    r.group["day"].clone(),
                    r.prompt_tokens,
                )
            })
            .collect();
        assert_eq!(
            got,
            [
                ("a".into(), "1970-01-02".into(), 10),
                ("a".into(), "1970-01-03".into(), 5),
                ("b".into(), "1970-01-02".into(), 7)
            ]
        );
        let totals = s.token_totals(2 * day).unwrap();
        assert_eq!(totals.get("a"), Some(&6));
        assert_eq!(totals.get("b"), None);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
