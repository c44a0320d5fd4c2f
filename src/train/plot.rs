//! `hrm-cu plot`: a run's `metrics.jsonl` drawn as one PNG.
//!
//! ```text
//! ┌─────────────────────────────┬──────────────────────────┐
//! │ loss: train, held-out       │ accuracy, exact accuracy │
//! ├─────────────────────────────┼──────────────────────────┤
//! │ lr (left), bp_steps (right) │ gradient norm            │
//! ├─────────────────────────────┼──────────────────────────┤
//! │ tokens/s (left), MFU (right)│ the last values, in words│
//! └─────────────────────────────┴──────────────────────────┘
//! ```
//!
//! The log is the trainer's (`src/train/mod.rs`): one JSON object per line, `"split": "train"`
//! records every `--log-every` steps and `"split": "heldout"` ones at each evaluation. A
//! resumed run appends the steps after its checkpoint again; the record written last wins.
//! A value the trainer could not write as a number (a non-finite gradient norm becomes
//! `null`) leaves a gap in its curve.
//!
//! Drawing is `plotters`' bitmap backend; text goes through `ab_glyph` with a font embedded
//! in the binary (Ubuntu Light from `epaint_default_fonts`), so no system font is needed.

use std::collections::BTreeMap;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use anyhow::{anyhow, bail, Context, Result};
use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};
use serde::{Deserialize, Deserializer};

/// Size of the image `hrm-cu plot` writes, in pixels.
pub const DEFAULT_SIZE: (u32, u32) = (1600, 1200);

/// One `"split": "train"` line of the log.
#[derive(Clone, Debug, Deserialize)]
pub struct TrainRecord {
    pub step: u64,
    #[serde(deserialize_with = "number_or_null")]
    pub loss: f64,
    #[serde(deserialize_with = "number_or_null")]
    pub accuracy: f64,
    #[serde(deserialize_with = "number_or_null")]
    pub exact_accuracy: f64,
    #[serde(deserialize_with = "number_or_null")]
    pub lr: f64,
    /// hrm's gradient depth; `null` for the nets without one.
    pub bp_steps: Option<u64>,
    #[serde(deserialize_with = "number_or_null")]
    pub grad_norm: f64,
    #[serde(deserialize_with = "number_or_null")]
    pub tokens_per_s: f64,
    /// Model FLOPs utilisation as a fraction (GPU runs on a card of known peak).
    #[serde(default)]
    pub mfu: Option<f64>,
}

/// One `"split": "heldout"` line of the log.
#[derive(Clone, Debug, Deserialize)]
pub struct HeldoutRecord {
    pub step: u64,
    #[serde(deserialize_with = "number_or_null")]
    pub loss: f64,
    #[serde(deserialize_with = "number_or_null")]
    pub accuracy: f64,
    #[serde(deserialize_with = "number_or_null")]
    pub exact_accuracy: f64,
}

/// A required number that may be `null` (serde_json writes NaN and infinities so): NaN here.
fn number_or_null<'de, D: Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
    Ok(Option::<f64>::deserialize(d)?.unwrap_or(f64::NAN))
}

/// The records of one log, each split in step order.
#[derive(Clone, Debug, Default)]
pub struct RunMetrics {
    pub train: Vec<TrainRecord>,
    pub heldout: Vec<HeldoutRecord>,
}

/// Reads `path` (a `metrics.jsonl`); errors name the file and the line.
pub fn read_metrics(path: &Path) -> Result<RunMetrics> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    parse_metrics(&text, path)
}

/// Parses the text of a log read from `path` (named in errors). A last line without its
/// newline that does not parse is the trainer caught mid-write: it is skipped with a note.
pub fn parse_metrics(text: &str, path: &Path) -> Result<RunMetrics> {
    let mut train = BTreeMap::new();
    let mut heldout = BTreeMap::new();
    let lines: Vec<&str> = text.split('\n').collect();
    for (i, line) in lines.iter().enumerate() {
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        let at = || format!("{} line {}", path.display(), i + 1);
        let value: serde_json::Value = match serde_json::from_str(line) {
            Ok(v) => v,
            Err(e) if i + 1 == lines.len() => {
                eprintln!("{}: skipped, not a complete JSON object ({e}); is the run still writing it?", at());
                continue;
            }
            Err(e) => return Err(e).with_context(|| format!("{}: not a JSON object", at())),
        };
        let split = value.get("split").and_then(|s| s.as_str()).map(str::to_owned);
        match split.as_deref() {
            Some("train") => {
                let r: TrainRecord = serde_json::from_value(value).with_context(|| format!("{}: a train record", at()))?;
                train.insert(r.step, r);
            }
            Some("heldout") => {
                let r: HeldoutRecord = serde_json::from_value(value).with_context(|| format!("{}: a held-out record", at()))?;
                heldout.insert(r.step, r);
            }
            Some(other) => bail!("{}: unknown split {other:?} (want \"train\" or \"heldout\")", at()),
            None => bail!("{}: no \"split\" field (want \"train\" or \"heldout\")", at()),
        }
    }
    if train.is_empty() && heldout.is_empty() {
        bail!("{} holds no records yet", path.display());
    }
    Ok(RunMetrics { train: train.into_values().collect(), heldout: heldout.into_values().collect() })
}

/// Plots `RUN/metrics.jsonl` to `out` (default `RUN/metrics.png`); returns the PNG's path.
pub fn plot_run(run_dir: &Path, out: Option<&Path>) -> Result<PathBuf> {
    let log = run_dir.join("metrics.jsonl");
    if !log.is_file() {
        bail!("{} not found: is {} a run directory (`hrm-cu train --out`)?", log.display(), run_dir.display());
    }
    let metrics = read_metrics(&log)?;
    let out = out.map_or_else(|| run_dir.join("metrics.png"), Path::to_path_buf);
    if out.extension().and_then(|e| e.to_str()) != Some("png") {
        bail!("{}: the plot is written as PNG, so its name must end in .png", out.display());
    }
    let title = run_dir.canonicalize().unwrap_or_else(|_| run_dir.to_path_buf());
    draw(&metrics, &title.display().to_string(), &out, DEFAULT_SIZE)?;
    Ok(out)
}

// ---------------------------------------------------------------------------------------
// Drawing.
// ---------------------------------------------------------------------------------------

/// One curve: (step, value) points, non-finite values left out.
#[derive(Clone)]
struct Series {
    label: &'static str,
    color: RGBColor,
    points: Vec<(f64, f64)>,
    /// Mark every point (the sparse held-out evaluations).
    markers: bool,
}

impl Series {
    fn new(label: &'static str, color: RGBColor, points: impl Iterator<Item = (u64, f64)>) -> Series {
        let points = points.filter(|(_, y)| y.is_finite()).map(|(x, y)| (x as f64, y)).collect();
        Series { label, color, points, markers: false }
    }

    fn with_markers(self) -> Series {
        Series { markers: true, ..self }
    }
}

/// One chart: its curves against the left axis and, optionally, against a right one.
struct Panel {
    title: &'static str,
    left: Vec<Series>,
    right: Vec<Series>,
    /// Fixed ranges of the left and right axes (otherwise the data's, padded).
    left_range: Option<Range<f64>>,
    right_range: Option<Range<f64>>,
    legend: SeriesLabelPosition,
}

const BLUE_: RGBColor = RGBColor(31, 119, 180);
const ORANGE: RGBColor = RGBColor(255, 127, 14);
const GREEN_: RGBColor = RGBColor(44, 160, 44);
const RED_: RGBColor = RGBColor(214, 39, 40);
const PURPLE: RGBColor = RGBColor(148, 103, 189);
const GREY: RGBColor = RGBColor(110, 110, 110);

/// The five charts of the module doc.
fn panels(m: &RunMetrics) -> Vec<Panel> {
    let train = |f: fn(&TrainRecord) -> f64| m.train.iter().map(move |r| (r.step, f(r)));
    let heldout = |f: fn(&HeldoutRecord) -> f64| m.heldout.iter().map(move |r| (r.step, f(r)));
    let panel = |title, left, right, legend| Panel { title, left, right, left_range: None, right_range: None, legend };
    vec![
        panel(
            "loss (mean cross-entropy, nats)",
            vec![Series::new("train", BLUE_, train(|r| r.loss)), Series::new("held-out", RED_, heldout(|r| r.loss)).with_markers()],
            vec![],
            SeriesLabelPosition::UpperRight,
        ),
        Panel {
            left_range: Some(-0.02..1.02),
            ..panel(
                "accuracy (per token) and exact accuracy (per sample)",
                vec![
                    Series::new("train accuracy", BLUE_, train(|r| r.accuracy)),
                    Series::new("train exact", GREEN_, train(|r| r.exact_accuracy)),
                    Series::new("held-out accuracy", RED_, heldout(|r| r.accuracy)).with_markers(),
                    Series::new("held-out exact", ORANGE, heldout(|r| r.exact_accuracy)).with_markers(),
                ],
                vec![],
                SeriesLabelPosition::LowerRight,
            )
        },
        panel(
            "learning rate (left) and hrm bp_steps (right)",
            vec![Series::new("lr", BLUE_, train(|r| r.lr))],
            vec![Series::new("bp_steps", ORANGE, m.train.iter().filter_map(|r| Some((r.step, r.bp_steps? as f64))))],
            SeriesLabelPosition::LowerRight,
        ),
        panel("gradient norm (L2, over every gradient)", vec![Series::new("grad norm", PURPLE, train(|r| r.grad_norm))], vec![], SeriesLabelPosition::UpperRight),
        Panel {
            left_range: Some(0.0..1.05 * m.train.iter().map(|r| r.tokens_per_s).filter(|v| v.is_finite()).fold(1.0, f64::max)),
            right_range: Some(0.0..100.0),
            ..panel(
                "throughput: tokens/s (left), MFU % (right)",
                vec![Series::new("tokens/s", GREEN_, train(|r| r.tokens_per_s))],
                vec![Series::new("MFU %", RED_, m.train.iter().filter_map(|r| Some((r.step, 100.0 * r.mfu?))))],
                SeriesLabelPosition::LowerRight,
            )
        },
    ]
}

/// Registers the embedded font under the family every chart asks for (once per process).
fn register_font() -> Result<()> {
    static REGISTERED: OnceLock<bool> = OnceLock::new();
    let ok = *REGISTERED.get_or_init(|| plotters::style::register_font("sans-serif", FontStyle::Normal, epaint_default_fonts::UBUNTU_LIGHT).is_ok());
    if ok {
        Ok(())
    } else {
        bail!("the embedded font (Ubuntu Light) did not load")
    }
}

/// Turns a drawing error (plotters' errors carry the backend's type) into one that names the
/// output file.
fn drawing<T, E: std::fmt::Display>(result: Result<T, E>, out: &Path) -> Result<T> {
    result.map_err(|e| anyhow!("drawing {}: {e}", out.display()))
}

/// Draws the charts of `metrics` under `title` into the PNG `out` of `size` pixels.
pub fn draw(metrics: &RunMetrics, title: &str, out: &Path, size: (u32, u32)) -> Result<()> {
    register_font()?;
    let root = BitMapBackend::new(out, size).into_drawing_area();
    drawing(root.fill(&WHITE), out)?;
    let (heading, body) = root.split_vertically(48);
    let title_style = ("sans-serif", 26).into_font().color(&BLACK).pos(Pos::new(HPos::Center, VPos::Center));
    drawing(heading.draw(&Text::new(title, (size.0 as i32 / 2, 24), title_style)), out)?;
    let cells = body.split_evenly((3, 2));
    let steps = metrics.train.iter().map(|r| r.step).chain(metrics.heldout.iter().map(|r| r.step));
    let (lo, hi) = steps.fold((u64::MAX, 0), |(lo, hi), s| (lo.min(s), hi.max(s)));
    let x = if lo < hi { lo as f64..hi as f64 } else { lo as f64 - 1.0..hi as f64 + 1.0 };
    for (cell, panel) in cells.iter().zip(panels(metrics)) {
        drawing(draw_panel(cell, &panel, x.clone()), out)?;
    }
    drawing(draw_summary(&cells[5], metrics), out)?;
    root.present().map_err(|e| anyhow!("writing {}: {e}", out.display()))
}

type Area<'a> = DrawingArea<BitMapBackend<'a>, Shift>;
type DrawResult<T> = Result<T, DrawingAreaErrorKind<<BitMapBackend<'static> as DrawingBackend>::ErrorType>>;

/// Draws one chart. A series with no points (bp_steps of a net without it, MFU of a CPU run)
/// is left out with its legend entry and, if it was the only one there, its axis.
fn draw_panel(area: &Area, panel: &Panel, x: Range<f64>) -> DrawResult<()> {
    let present = |series: &[Series]| series.iter().filter(|s| !s.points.is_empty()).cloned().collect::<Vec<Series>>();
    let (left_series, right_series) = (present(&panel.left), present(&panel.right));
    let left = panel.left_range.clone().unwrap_or_else(|| data_range(&left_series));
    let right = panel.right_range.clone().unwrap_or_else(|| data_range(&right_series));
    let has_right = !right_series.is_empty();
    let mut chart = ChartBuilder::on(area)
        .caption(panel.title, ("sans-serif", 20))
        .margin(10)
        .margin_right(if has_right { 10 } else { 28 })
        .x_label_area_size(44)
        .y_label_area_size(64)
        .right_y_label_area_size(if has_right { 56 } else { 0 })
        .build_cartesian_2d(x.clone(), left)?
        .set_secondary_coord(x, right);
    chart
        .configure_mesh()
        .x_desc("step")
        .x_label_formatter(&|v| compact(*v))
        .y_label_formatter(&|v| compact(*v))
        .label_style(("sans-serif", 15))
        .light_line_style(WHITE)
        .draw()?;
    if has_right {
        chart.configure_secondary_axes().y_label_formatter(&|v| compact(*v)).label_style(("sans-serif", 15)).draw()?;
    }
    for (s, secondary) in left_series.iter().map(|s| (s, false)).chain(right_series.iter().map(|s| (s, true))) {
        let style = s.color.stroke_width(2);
        let line = LineSeries::new(s.points.iter().copied(), style).point_size(if s.markers { 3 } else { 0 });
        let anno = if secondary { chart.draw_secondary_series(line)? } else { chart.draw_series(line)? };
        let color = s.color;
        anno.label(s.label).legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2)));
    }
    if left_series.is_empty() && right_series.is_empty() {
        let (w, h) = area.dim_in_pixel();
        let style = ("sans-serif", 18).into_font().color(&GREY).pos(Pos::new(HPos::Center, VPos::Center));
        area.draw(&Text::new("not in this log", (w as i32 / 2, h as i32 / 2), style))?;
        return Ok(());
    }
    chart
        .configure_series_labels()
        .position(panel.legend.clone())
        .label_font(("sans-serif", 15))
        .background_style(WHITE.mix(0.85))
        .border_style(RGBColor(200, 200, 200))
        .draw()?;
    Ok(())
}

/// The last values in words: what a reader looks for first.
fn draw_summary(area: &Area, m: &RunMetrics) -> DrawResult<()> {
    let mut lines = Vec::new();
    if let Some(r) = m.train.last() {
        lines.push(format!("last train step {}: loss {:.4}, accuracy {:.3}, exact {:.3}", r.step, r.loss, r.accuracy, r.exact_accuracy));
        lines.push(format!("    lr {:.2e}, grad norm {:.3}, {} tokens/s", r.lr, r.grad_norm, compact(r.tokens_per_s)));
        match r.mfu {
            Some(mfu) => lines.push(format!("    MFU {:.1}%", 100.0 * mfu)),
            None => lines.push("    no MFU logged (a CPU run, or a GPU of unknown peak)".to_string()),
        }
    }
    if let Some(r) = m.heldout.last() {
        lines.push(format!("held-out at step {}: loss {:.4}, accuracy {:.3}, exact {:.3}", r.step, r.loss, r.accuracy, r.exact_accuracy));
    }
    if let Some(best) = m.heldout.iter().filter(|r| r.exact_accuracy.is_finite()).max_by(|a, b| a.exact_accuracy.total_cmp(&b.exact_accuracy)) {
        lines.push(format!("best held-out exact accuracy {:.3} at step {}", best.exact_accuracy, best.step));
    }
    lines.push(format!("{} train and {} held-out records", m.train.len(), m.heldout.len()));
    let font = ("sans-serif", 19).into_font();
    area.draw(&Text::new("summary", (24, 16), ("sans-serif", 20).into_font()))?;
    for (i, line) in lines.iter().enumerate() {
        area.draw(&Text::new(line.as_str(), (24, 56 + 30 * i as i32), font.clone()))?;
    }
    Ok(())
}

/// The range of the series' values, padded by 5% (a flat curve gets a band around it).
fn data_range(series: &[Series]) -> Range<f64> {
    let values = series.iter().flat_map(|s| s.points.iter().map(|p| p.1));
    let (lo, hi) = values.fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| (lo.min(v), hi.max(v)));
    if !lo.is_finite() {
        return 0.0..1.0;
    }
    let pad = if hi > lo { 0.05 * (hi - lo) } else { 0.1 * lo.abs().max(1e-12) };
    lo - pad..hi + pad
}

/// A short axis label: `12.3k`, `4.5M` for large values, `1.0e-4` for small ones, else up to
/// three significant digits.
fn compact(v: f64) -> String {
    let a = v.abs();
    if a == 0.0 {
        "0".to_string()
    } else if a >= 1e6 {
        format!("{:.1}M", v / 1e6)
    } else if a >= 1e4 {
        format!("{:.1}k", v / 1e3)
    } else if a < 1e-2 {
        format!("{v:.1e}")
    } else if a >= 100.0 {
        format!("{v:.0}")
    } else {
        let s = format!("{v:.3}");
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compact_labels() {
        assert_eq!(compact(0.0), "0");
        assert_eq!(compact(12_345.0), "12.3k");
        assert_eq!(compact(2_500_000.0), "2.5M");
        assert_eq!(compact(0.001), "1.0e-3");
        assert_eq!(compact(0.25), "0.25");
        assert_eq!(compact(3.0), "3");
        assert_eq!(compact(450.0), "450");
    }

    #[test]
    fn flat_and_empty_series_get_a_usable_range() {
        let flat = Series::new("x", BLUE_, [(1, 2.0), (2, 2.0)].into_iter());
        let r = data_range(&[flat]);
        assert!(r.start < 2.0 && r.end > 2.0);
        assert_eq!(data_range(&[]), 0.0..1.0);
    }
}
