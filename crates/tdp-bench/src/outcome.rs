//! What a run produced ([`Outcome`]): the rows, the notes, the harvest figures ([`Series`]) and the charts
//! ([`Chart`]) to draw. The groups fill it, [`crate::suite`] collects it, [`crate::plot`] draws from it;
//! it depends on none of them.

use crate::report::Row;

/// What a run produced: the rows, and notes that explain them (noise, flush counts, sanity figures).
#[derive(Clone, Debug, Default)]
pub struct Outcome {
    /// One row per comparison.
    pub rows: Vec<Row>,
    /// Human-readable side figures.
    pub notes: Vec<String>,
    /// The harvest-cost figures, for the plot, when the `harvest` group ran.
    pub harvest: Option<Series>,
    /// More charts to draw: `(file name, chart)`, drawn beside the harvest plot.
    pub charts: Vec<(&'static str, Chart<'static>)>,
}

/// The figures of one size, µs per harvest.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Point {
    /// Memory size in GiB.
    pub gib: u64,
    /// The dirty ring: harvest + reset.
    pub ring: f64,
    /// The bitmap: `get_and_clear`.
    pub bitmap: f64,
    /// The bitmap with manual protect: `get` + `clear`.
    pub manual: f64,
}

/// The figures of one run, for the plot: one point per size, in increasing size.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Series {
    /// The points.
    pub points: Vec<Point>,
}

/// One chart: a caption, axis names, the x values and one named line per series (a y value per x).
#[derive(Clone, Debug, PartialEq)]
pub struct Chart<'a> {
    /// Title above the chart.
    pub caption: String,
    /// The x axis's name.
    pub x_desc: &'a str,
    /// The y axis's name.
    pub y_desc: &'a str,
    /// The x values, increasing and positive (the x axis is log base 2).
    pub xs: Vec<f64>,
    /// `(label, ys)` per line; each `ys` as long as `xs`, positive (the y axis is log base 10).
    pub series: Vec<(&'a str, Vec<f64>)>,
}
