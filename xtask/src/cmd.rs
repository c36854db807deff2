//! Running child commands: the repository root, a `cargo` that is the one running us, and a `run` that
//! echoes the command line and turns a non-zero exit into an error naming the command.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};

/// The repository root: the parent of this crate's manifest directory, fixed at compile time.
#[must_use]
pub fn repo_root() -> PathBuf {
    let manifest_dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest_dir.parent().expect("xtask lives one level below the repository root").to_path_buf()
}

/// A `cargo` command, run in the repository root.
///
/// Uses the `CARGO` variable that `cargo run` sets, so the nested builds use the same toolchain as the
/// one that built xtask (rustup's proxy would pick the same one, but this does not depend on it).
#[must_use]
pub fn cargo() -> Command {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.current_dir(repo_root());
    cmd
}

/// The command line as a shell user would type it, for headers and error messages.
#[must_use]
pub fn display(cmd: &Command) -> String {
    let mut parts: Vec<String> = Vec::new();
    for (key, value) in cmd.get_envs() {
        if let Some(value) = value {
            parts.push(format!("{}={}", key.to_string_lossy(), quote(value)));
        }
    }
    let program = Path::new(cmd.get_program());
    // `CARGO` is an absolute path into the toolchain; print the short name.
    let short = program.file_name().filter(|name| *name == "cargo").unwrap_or(program.as_os_str());
    parts.push(quote(short));
    parts.extend(cmd.get_args().map(quote));
    parts.join(" ")
}

fn quote(arg: &OsStr) -> String {
    let s = arg.to_string_lossy();
    if !s.is_empty() && s.chars().all(|c| c.is_ascii_alphanumeric() || "-_=./:,+@%".contains(c)) {
        s.into_owned()
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}

/// Runs `cmd` with inherited stdio after printing its command line.
///
/// # Errors
/// If the command cannot be started or exits unsuccessfully; the message names the command line.
pub fn run(cmd: &mut Command) -> Result<()> {
    let line = display(cmd);
    println!("$ {line}");
    let status = cmd.status().with_context(|| format!("cannot start `{line}`"))?;
    if !status.success() {
        bail!("`{line}` failed: {status}");
    }
    Ok(())
}

/// Runs `cmd` quietly and reports whether it exited successfully; a command that cannot start counts as
/// a failure. For probes such as `cargo fmt --version`.
#[must_use]
pub fn succeeds(cmd: &mut Command) -> bool {
    cmd.stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|status| status.success())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_quotes_only_what_a_shell_would_split() {
        let mut cmd = Command::new("cargo");
        cmd.args(["doc", "--no-deps"]).env("RUSTDOCFLAGS", "-D warnings");
        assert_eq!(display(&cmd), "RUSTDOCFLAGS='-D warnings' cargo doc --no-deps");
        let mut cmd = Command::new("/opt/toolchain/bin/cargo");
        cmd.arg("it's");
        assert_eq!(display(&cmd), r"cargo 'it'\''s'");
    }

    #[test]
    fn repo_root_holds_the_workspace_manifest() {
        assert!(repo_root().join("Cargo.toml").is_file());
        assert!(repo_root().join("xtask").is_dir());
    }
}
