//! The plots: line charts drawn with `plotters` to SVG files. `harvest_vs_memory` draws µs per harvest of
//! 1000 dirty pages against memory size (log-log) for the in-process ring and bitmaps
//! (`docs/img/harvest_vs_memory.svg` by default); [`lines`] draws any set of series, which the real-KVM
//! groups use (`docs/img/kvm_*.svg`). Text is left to the SVG viewer's fonts, so no font library is needed.

use std::io;
use std::path::Path;

use plotters::prelude::*;

use crate::harvest::DIRTY;
pub use crate::outcome::Chart;
use crate::outcome::Series;

/// Picture size in pixels.
const SIZE: (u32, u32) = (800, 500);

/// The line colours, in order (a colour-blind-safe palette).
const COLORS: [RGBColor; 5] = [
    RGBColor(0, 114, 178),
    RGBColor(213, 94, 0),
    RGBColor(0, 158, 115),
    RGBColor(204, 121, 167),
    RGBColor(86, 180, 233),
];

/// Draws `series` (the in-process harvest figures) to `path` (creating its folder).
///
/// # Errors
/// Creating the folder, or drawing and writing the file; also when `series` has no point.
pub fn harvest_vs_memory(series: &Series, path: &Path) -> io::Result<()> {
    let p = &series.points;
    lines(
        &Chart {
            caption: format!("Harvest of {DIRTY} dirty pages vs memory size"),
            x_desc: "guest memory (GiB)",
            y_desc: "µs per harvest (harvest + re-protect batching)",
            xs: p.iter().map(|p| p.gib as f64).collect(),
            series: vec![
                ("dirty ring: harvest + reset", p.iter().map(|p| p.ring).collect()),
                ("bitmap: get_and_clear", p.iter().map(|p| p.bitmap).collect()),
                ("bitmap, manual protect: get + clear", p.iter().map(|p| p.manual).collect()),
            ],
        },
        path,
    )
}

/// Draws `chart` to `path` (creating its folder).
///
/// # Errors
/// Creating the folder, or drawing and writing the file; also when the chart has no point or a series'
/// length differs from the x values'.
pub fn lines(chart: &Chart<'_>, path: &Path) -> io::Result<()> {
    let (Some(&first), Some(&last)) = (chart.xs.first(), chart.xs.last()) else {
        return Err(io::Error::other("no figures to plot"));
    };
    if chart.series.iter().any(|(_, ys)| ys.len() != chart.xs.len()) {
        return Err(io::Error::other("a series' length differs from the x values'"));
    }
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let ys = chart.series.iter().flat_map(|(_, ys)| ys.iter().copied());
    let (lo, hi) = ys.fold((f64::MAX, f64::MIN), |(lo, hi), y| (lo.min(y), hi.max(y)));
    let x_range = (first / 1.3)..(last * 1.3);
    let y_range = (lo / 2.0).max(1e-3)..(hi * 2.0);
    draw(chart, x_range, y_range, path).map_err(|e| io::Error::other(e.to_string()))
}

fn draw(
    c: &Chart<'_>,
    x: std::ops::Range<f64>,
    y: std::ops::Range<f64>,
    path: &Path,
) -> Result<(), Box<dyn std::error::Error>> {
    let root = SVGBackend::new(path, SIZE).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(&c.caption, ("sans-serif", 22))
        .margin(16)
        .x_label_area_size(48)
        .y_label_area_size(64)
        .build_cartesian_2d(x.log_scale().base(2.0), y.log_scale())?;
    chart
        .configure_mesh()
        .x_desc(c.x_desc)
        .y_desc(c.y_desc)
        .x_label_formatter(&|v| format!("{v:.0}"))
        .y_label_formatter(&|v| format!("{v}"))
        .draw()?;
    for (i, (label, ys)) in c.series.iter().enumerate() {
        let color = COLORS[i % COLORS.len()];
        let data = c.xs.iter().copied().zip(ys.iter().copied());
        chart
            .draw_series(LineSeries::new(data, color.stroke_width(2)).point_size(4))?
            .label(*label)
            .legend(move |(x, y)| PathElement::new([(x, y), (x + 20, y)], color.stroke_width(2)));
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .background_style(WHITE.mix(0.9))
        .border_style(BLACK)
        .draw()?;
    root.present()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::harvest::Point;

    #[test]
    fn plot_is_an_svg_with_the_three_series() {
        let point = |gib, ring, bitmap, manual| Point { gib, ring, bitmap, manual };
        let points = vec![point(1, 5.0, 2.0, 3.0), point(4, 5.1, 6.0, 9.0), point(16, 5.0, 20.0, 30.0)];
        let series = Series { points };
        let dir = std::env::temp_dir().join(format!("tdp-bench-plot-{}", std::process::id()));
        let path = dir.join("h.svg");
        harvest_vs_memory(&series, &path).unwrap();
        let svg = std::fs::read_to_string(&path).unwrap();
        assert!(svg.starts_with("<svg") && svg.contains("dirty ring") && svg.contains("get_and_clear"));
        assert!(harvest_vs_memory(&Series::default(), &path).is_err());
        let ragged = Chart {
            caption: "x".into(),
            x_desc: "x",
            y_desc: "y",
            xs: vec![1.0, 2.0],
            series: vec![("a", vec![1.0])],
        };
        assert!(lines(&ragged, &path).is_err(), "a series shorter than the x values is refused");
        std::fs::remove_dir_all(dir).unwrap();
    }
}
