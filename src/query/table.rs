//! Query output for the CLI: tables for people, CSV and JSON for programs.

use std::fmt::Write as _;

use serde::Serialize;

use crate::decode::format_rfc3339;
use crate::storage::read::{DeviceRow, ReadingRow, RollupRow};

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    Table,
    Csv,
    Json,
}

/// Rows as text in `format`: an aligned table, CSV with a header, or a JSON array.
pub fn render<R: Tabular + Serialize>(rows: &[R], format: Format) -> String {
    match format {
        Format::Json => serde_json::to_string_pretty(rows).unwrap_or_else(|_| "[]".into()) + "\n",
        Format::Csv => {
            let mut out = R::HEADER.join(",") + "\n";
            for row in rows {
                let cells: Vec<String> = row.cells().into_iter().map(|c| csv_escape(&c)).collect();
                out.push_str(&cells.join(","));
                out.push('\n');
            }
            out
        }
        Format::Table => {
            let cells: Vec<Vec<String>> = rows.iter().map(Tabular::cells).collect();
            let mut widths: Vec<usize> = R::HEADER.iter().map(|h| h.len()).collect();
            for row in &cells {
                for (w, cell) in widths.iter_mut().zip(row) {
                    *w = (*w).max(cell.chars().count());
                }
            }
            let mut out = String::new();
            let line = |out: &mut String, row: &[String]| {
                let text: Vec<String> = row
                    .iter()
                    .zip(&widths)
                    .map(|(c, w)| format!("{c:<w$}"))
                    .collect();
                let _ = writeln!(out, "{}", text.join("  ").trim_end());
            };
            line(
                &mut out,
                &R::HEADER.iter().map(|h| h.to_string()).collect::<Vec<_>>(),
            );
            for row in &cells {
                line(&mut out, row);
            }
            out
        }
    }
}

fn csv_escape(cell: &str) -> String {
    if cell.contains([',', '"', '\n']) {
        format!("\"{}\"", cell.replace('"', "\"\""))
    } else {
        cell.to_string()
    }
}

/// A row type with fixed columns.
pub trait Tabular {
    const HEADER: &'static [&'static str];
    fn cells(&self) -> Vec<String>;
}

fn time(ms: Option<i64>) -> String {
    ms.map(format_rfc3339).unwrap_or_default()
}

impl Tabular for ReadingRow {
    const HEADER: &'static [&'static str] = &["time", "device", "metric", "value", "unit", "flags"];
    fn cells(&self) -> Vec<String> {
        vec![
            time(Some(self.time)),
            self.device.to_string(),
            self.metric.to_string(),
            self.value.to_string(),
            self.unit.as_deref().unwrap_or_default().to_string(),
            self.flags.to_string(),
        ]
    }
}

impl Tabular for RollupRow {
    const HEADER: &'static [&'static str] = &[
        "bucket", "device", "metric", "count", "min", "max", "mean", "first", "last", "unit",
    ];
    fn cells(&self) -> Vec<String> {
        vec![
            time(Some(self.bucket)),
            self.device.to_string(),
            self.metric.to_string(),
            self.count.to_string(),
            self.min.to_string(),
            self.max.to_string(),
            format!("{:.4}", self.mean),
            self.first.to_string(),
            self.last.to_string(),
            self.unit.as_deref().unwrap_or_default().to_string(),
        ]
    }
}

impl Tabular for DeviceRow {
    const HEADER: &'static [&'static str] = &[
        "device",
        "kind",
        "state",
        "since",
        "last_seen",
        "readings",
        "rejections",
        "duplicates",
        "dropped",
        "faults",
        "last_error",
    ];
    fn cells(&self) -> Vec<String> {
        vec![
            self.name.clone(),
            self.kind.clone(),
            self.state.clone(),
            time(self.state_since),
            time(self.last_seen),
            self.readings.to_string(),
            self.rejections.to_string(),
            self.duplicates.to_string(),
            self.dropped.to_string(),
            self.faults(),
            self.last_error.clone().unwrap_or_default(),
        ]
    }
}

impl DeviceRow {
    /// The non-zero fault counters in words, e.g. `3 timeouts 1 crc_errors`.
    fn faults(&self) -> String {
        [
            (self.reconnects, "reconnects"),
            (self.timeouts, "timeouts"),
            (self.crc_errors, "crc_errors"),
            (self.exceptions, "exceptions"),
        ]
        .iter()
        .filter(|(n, _)| *n > 0)
        .map(|(n, name)| format!("{n} {name}"))
        .collect::<Vec<_>>()
        .join(" ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row() -> ReadingRow {
        ReadingRow {
            device: "bay3".into(),
            metric: "temp".into(),
            unit: Some("°C".into()),
            time: 1_700_000_000_000,
            received_at: 1_700_000_000_000,
            value: 21.5,
            flags: 0,
        }
    }

    #[test]
    fn renders_csv_with_header() {
        let out = render(&[row()], Format::Csv);
        assert_eq!(
            out,
            "time,device,metric,value,unit,flags\n2023-11-14T22:13:20Z,bay3,temp,21.5,°C,0\n"
        );
    }

    #[test]
    fn renders_json_array() {
        let out: serde_json::Value = serde_json::from_str(&render(&[row()], Format::Json)).unwrap();
        assert_eq!(out[0]["value"], 21.5);
    }

    #[test]
    fn aligns_table_columns() {
        let out = render(&[row()], Format::Table);
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines[0].find("device"), lines[1].find("bay3"));
    }
}
