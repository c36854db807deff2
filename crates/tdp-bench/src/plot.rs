//! The harvest-cost plot: µs per harvest of 1000 dirty pages against memory size, log-log, for the dirty
//! ring and the two bitmap harvests, drawn with `plotters` to an SVG file (`docs/img/harvest_vs_memory.svg`
//! by default). Text is left to the SVG viewer's fonts, so no font library is needed to build it.

use std::io;
use std::path::Path;

use plotters::prelude::*;

use crate::harvest::{DIRTY, Point, Series};

/// Picture size in pixels.
const SIZE: (u32, u32) = (800, 500);

/// Draws `series` to `path` (creating its folder).
///
/// # Errors
/// Creating the folder, or drawing and writing the file; also when `series` has no point.
pub fn harvest_vs_memory(series: &Series, path: &Path) -> io::Result<()> {
    let points = &series.points;
    let (Some(first), Some(last)) = (points.first(), points.last()) else {
        return Err(io::Error::other("no harvest figures to plot"));
    };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let ys = points.iter().flat_map(|p| [p.ring, p.bitmap, p.manual]);
    let (lo, hi) = ys.fold((f64::MAX, f64::MIN), |(lo, hi), y| (lo.min(y), hi.max(y)));
    let x_range = (first.gib as f64 / 1.3)..(last.gib as f64 * 1.3);
    let y_range = (lo / 2.0).max(1e-3)..(hi * 2.0);
    draw(points, x_range, y_range, path).map_err(|e| io::Error::other(e.to_string()))
}

/// Which figure of a point a line shows.
type YOf = fn(&Point) -> f64;

fn draw(
    points: &[Point],
    x: std::ops::Range<f64>,
    y: std::ops::Range<f64>,
    path: &Path,
) -> Result<(), Box<dyn std::error::Error>> {
    let root = SVGBackend::new(path, SIZE).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(format!("Harvest of {DIRTY} dirty pages vs memory size"), ("sans-serif", 22))
        .margin(16)
        .x_label_area_size(48)
        .y_label_area_size(64)
        .build_cartesian_2d(x.log_scale().base(2.0), y.log_scale())?;
    chart
        .configure_mesh()
        .x_desc("guest memory (GiB)")
        .y_desc("µs per harvest (harvest + re-protect batching)")
        .x_label_formatter(&|v| format!("{v:.0}"))
        .y_label_formatter(&|v| format!("{v}"))
        .draw()?;
    let lines: [(&str, RGBColor, YOf); 3] = [
        ("dirty ring: harvest + reset", RGBColor(0, 114, 178), |p| p.ring),
        ("bitmap: get_and_clear", RGBColor(213, 94, 0), |p| p.bitmap),
        ("bitmap, manual protect: get + clear", RGBColor(0, 158, 115), |p| p.manual),
    ];
    for (label, color, y_of) in lines {
        let data = points.iter().map(|p| (p.gib as f64, y_of(p)));
        chart
            .draw_series(LineSeries::new(data, color.stroke_width(2)).point_size(4))?
            .label(label)
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
        std::fs::remove_dir_all(dir).unwrap();
        assert!(harvest_vs_memory(&Series::default(), &path).is_err());
    }
}
