//! The house rules, run over the repository as a plain test so that `cargo test --workspace` (CI's test
//! step) enforces them: module headers, no hidden tests, no `todo!`, SAFETY comments on `unsafe` blocks.
//! The rules themselves, and tests that each catches a broken example, are in `xtask/src/tidy.rs`.

#[test]
fn tidy_house_rules_hold_across_the_tree() {
    let root = xtask::cmd::repo_root();
    let (checked, offences) = xtask::tidy::check_tree(&root).expect("the source tree is readable");
    // xtask alone has more files than this; fewer means the walk is broken, not that the tree is clean.
    assert!(checked >= 5, "tidy found only {checked} .rs files under {:?}", xtask::tidy::ROOTS);
    let report: Vec<String> = offences.iter().map(ToString::to_string).collect();
    assert!(report.is_empty(), "{} tidy offence(s) in {checked} files:\n{}", report.len(), report.join("\n"));
}
