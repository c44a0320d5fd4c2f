//! `hrm-cu plot`: a small log becomes a PNG of the expected size, and bad logs fail with the
//! file and line named.

use std::path::Path;

use hrm_cu::train::plot::{self, DEFAULT_SIZE};

/// Ten logged steps with evaluations every third, as the trainer writes them: a GPU run
/// (tflops, mfu), hrm's bp_steps warming up, and one non-finite gradient norm (`null`).
fn sample_log() -> String {
    let mut lines = Vec::new();
    for step in (10..=100).step_by(10) {
        let loss = 3.0 / (1.0 + step as f64 / 20.0);
        let grad_norm = if step == 50 { "null".to_string() } else { format!("{}", 1.0 / step as f64) };
        lines.push(format!(
            r#"{{"split":"train","step":{step},"epoch":0,"loss":{loss},"accuracy":{acc},"exact_accuracy":{exact},"lr":{lr},"bp_steps":{bp},"grad_norm":{grad_norm},"tokens":2048,"tokens_seen":{seen},"tokens_per_s":{tps},"elapsed_s":{el},"tflops":{tf},"mfu":{mfu}}}"#,
            acc = 1.0 - loss / 3.0,
            exact = (1.0 - loss / 3.0).powi(4),
            lr = 1e-3 * step as f64 / 100.0,
            bp = 2 + step / 40,
            seen = step * 2048,
            tps = 120_000.0 + step as f64,
            el = step as f64 * 0.02,
            tf = 400.0,
            mfu = 0.4 + step as f64 * 1e-4,
        ));
        if step % 30 == 0 {
            lines.push(format!(r#"{{"split":"heldout","step":{step},"loss":{},"accuracy":0.5,"exact_accuracy":0.25,"tokens":900}}"#, loss * 1.1));
        }
    }
    lines.join("\n") + "\n"
}

fn png_size(path: &Path) -> (u32, u32) {
    let decoder = png::Decoder::new(std::fs::File::open(path).unwrap());
    let mut reader = decoder.read_info().unwrap();
    let mut buf = vec![0; reader.output_buffer_size()];
    let frame = reader.next_frame(&mut buf).unwrap();
    // Something besides the white background was drawn.
    assert!(buf[..frame.buffer_size()].iter().any(|&b| b < 128), "{} is blank", path.display());
    (frame.width, frame.height)
}

#[test]
fn a_run_is_plotted_to_a_png_of_the_expected_size() {
    let run = tempfile::tempdir().unwrap();
    std::fs::write(run.path().join("metrics.jsonl"), sample_log()).unwrap();
    let out = plot::plot_run(run.path(), None).unwrap();
    assert_eq!(out, run.path().join("metrics.png"));
    assert_eq!(png_size(&out), DEFAULT_SIZE);

    let elsewhere = run.path().join("curves.png");
    assert_eq!(plot::plot_run(run.path(), Some(&elsewhere)).unwrap(), elsewhere);
    assert_eq!(png_size(&elsewhere), DEFAULT_SIZE);
}

#[test]
fn records_are_read_in_step_order_and_the_last_write_of_a_step_wins() {
    // A resumed run logs the steps after its checkpoint again.
    let log = sample_log() + r#"{"split":"train","step":20,"loss":9.0,"accuracy":0,"exact_accuracy":0,"lr":0.001,"bp_steps":null,"grad_norm":1,"tokens_per_s":5}"#;
    let m = plot::parse_metrics(&log, Path::new("metrics.jsonl")).unwrap();
    assert_eq!(m.train.len(), 10);
    assert_eq!(m.heldout.len(), 3);
    assert!(m.train.windows(2).all(|w| w[0].step < w[1].step));
    let step20 = &m.train[1];
    assert_eq!((step20.step, step20.loss, step20.bp_steps, step20.mfu), (20, 9.0, None, None));
    assert!(m.train[4].grad_norm.is_nan(), "null reads as NaN");
    assert!((m.train[0].mfu.unwrap() - 0.401).abs() < 1e-12);
}

#[test]
fn a_torn_last_line_is_skipped() {
    // The trainer caught mid-write: the last line has no newline and does not parse.
    let log = sample_log() + r#"{"split":"train","step":110,"lo"#;
    assert_eq!(plot::parse_metrics(&log, Path::new("m.jsonl")).unwrap().train.len(), 10);
}

#[test]
fn bad_logs_name_the_file_and_the_line() {
    let err = |text: &str| format!("{:#}", plot::parse_metrics(text, Path::new("runs/x/metrics.jsonl")).unwrap_err());
    let good = r#"{"split":"heldout","step":5,"loss":1,"accuracy":0.5,"exact_accuracy":0.1}"#;

    let e = err(&format!("{good}\nnot json\n{good}\n"));
    assert!(e.contains("runs/x/metrics.jsonl line 2") && e.contains("not a JSON object"), "{e}");

    let e = err(&format!("{good}\n{}\n", r#"{"split":"train","step":1,"loss":1}"#));
    assert!(e.contains("line 2") && e.contains("missing field `accuracy`"), "{e}");

    let e = err(&format!("{}\n", r#"{"split":"valid","step":1}"#));
    assert!(e.contains("line 1") && e.contains("unknown split \"valid\""), "{e}");

    let e = err(&format!("{good}\n{}\n", r#"{"step":1}"#));
    assert!(e.contains("line 2") && e.contains("no \"split\""), "{e}");

    let e = err(&format!("{}\n", r#"{"split":"heldout","step":"five","loss":1,"accuracy":0.5,"exact_accuracy":0.1}"#));
    assert!(e.contains("line 1") && e.contains("invalid type"), "{e}");

    let e = err("\n\n");
    assert!(e.contains("runs/x/metrics.jsonl holds no records"), "{e}");
}

#[test]
fn the_output_must_be_a_png() {
    let run = tempfile::tempdir().unwrap();
    std::fs::write(run.path().join("metrics.jsonl"), sample_log()).unwrap();
    let e = format!("{:#}", plot::plot_run(run.path(), Some(&run.path().join("curves.jpg"))).unwrap_err());
    assert!(e.contains("curves.jpg") && e.contains(".png"), "{e}");
}

#[test]
fn a_directory_without_a_log_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let e = format!("{:#}", plot::plot_run(dir.path(), None).unwrap_err());
    assert!(e.contains(&dir.path().join("metrics.jsonl").display().to_string()) && e.contains("not found"), "{e}");
}
