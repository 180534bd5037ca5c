//! Decoding configuration rows: an error that names the row (kind and `namespace/name`) and the
//! column, and the column readers every row type uses, so that a bad row in the database tells
//! which resource it is instead of failing the whole snapshot anonymously.

use sqlx::{Row, postgres::PgRow};

/// A row that does not decode, named by its key so that the message points at the resource:
/// `trunk default/main: error decoding column "codecs": "G729" is not one of PCMU, ...`. `load_all` returns
/// it as [`sqlx::Error::Decode`]; the message carries the cause, so it has no `source()`.
#[derive(Debug)]
struct RowError {
    /// What the row is, e.g. `trunk`.
    kind: &'static str,
    /// `namespace/name` of the row.
    key: String,
    error: sqlx::Error,
}

impl std::fmt::Display for RowError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}: ", self.kind, self.key)?;
        match &self.error {
            sqlx::Error::ColumnDecode { index, source } => write!(f, "error decoding column {index}: {source}"),
            other => write!(f, "{other}"),
        }
    }
}

impl std::error::Error for RowError {}

/// Decodes every row with `from_row`; the first row that does not decode fails the whole load
/// with a [`RowError`] naming it by its `key_columns` (`?` for a key column that does not decode).
pub(crate) fn decode_rows<T>(
    rows: &[PgRow],
    kind: &'static str,
    [namespace, name]: [&str; 2],
    from_row: fn(&PgRow) -> Result<T, sqlx::Error>,
) -> Result<Vec<T>, sqlx::Error> {
    let text = |row: &PgRow, column: &str| row.try_get::<String, _>(column).unwrap_or_else(|_| "?".into());
    rows.iter()
        .map(|row| {
            from_row(row).map_err(|error| {
                let key = format!("{}/{}", text(row, namespace), text(row, name));
                sqlx::Error::Decode(Box::new(RowError { kind, key, error }))
            })
        })
        .collect()
}

/// A value of `column` that was read but is not valid. The index is quoted as sqlx quotes it.
pub(crate) fn column_error(column: &str, source: impl Into<sqlx::error::BoxDynError>) -> sqlx::Error {
    sqlx::Error::ColumnDecode { index: format!("{column:?}"), source: source.into() }
}

pub(crate) fn parse_text<T: std::str::FromStr<Err = String>>(row: &PgRow, column: &str) -> Result<T, sqlx::Error> {
    let text: String = row.try_get(column)?;
    text.parse().map_err(|e: String| column_error(column, e))
}

pub(crate) fn parse_json<T: serde::de::DeserializeOwned>(row: &PgRow, column: &str) -> Result<T, sqlx::Error> {
    let value: serde_json::Value = row.try_get(column)?;
    serde_json::from_value(value).map_err(|e| column_error(column, e))
}

pub(crate) fn parse_opt_json<T: serde::de::DeserializeOwned>(
    row: &PgRow,
    column: &str,
) -> Result<Option<T>, sqlx::Error> {
    let value: Option<serde_json::Value> = row.try_get(column)?;
    value.map(serde_json::from_value).transpose().map_err(|e| column_error(column, e))
}

pub(crate) fn opt_u16(row: &PgRow, column: &str) -> Result<Option<u16>, sqlx::Error> {
    Ok(row.try_get::<Option<i32>, _>(column)?.map(|v| v.clamp(0, u16::MAX as i32) as u16))
}

pub(crate) fn opt_u32(row: &PgRow, column: &str) -> Result<Option<u32>, sqlx::Error> {
    Ok(row.try_get::<Option<i32>, _>(column)?.map(|v| v.max(0) as u32))
}

pub(crate) fn u32_col(row: &PgRow, column: &str) -> Result<u32, sqlx::Error> {
    Ok(row.try_get::<i32, _>(column)?.max(0) as u32)
}

pub(crate) fn to_i32(v: u32) -> i32 {
    i32::try_from(v).unwrap_or(i32::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn row_errors_name_the_row_and_the_column() {
        let error =
            RowError { kind: "trunk", key: "default/main".into(), error: column_error("codecs", "unknown codec G729") };
        assert_eq!(error.to_string(), r#"trunk default/main: error decoding column "codecs": unknown codec G729"#);
        let error =
            RowError { kind: "routing rule", key: "?/broken".into(), error: sqlx::Error::ColumnNotFound("x".into()) };
        assert_eq!(error.to_string(), "routing rule ?/broken: no column found for name: x");
    }
}
