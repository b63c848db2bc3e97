//! `raft-host new`: a ready-to-build guest project from the templates kept
//! in `guests/templates` (built and tested with the workspace's tests).

use anyhow::{Context, bail};
use clap::{Args, ValueEnum};
use std::path::{Path, PathBuf};

#[derive(Clone, Copy, ValueEnum)]
enum Lang {
    Rust,
}

#[derive(Args)]
pub struct NewArgs {
    /// The project's name, which is also the state machine's name it
    /// suggests (lowercase letters, digits and dashes, at most 64).
    name: String,
    /// The guest's language.
    #[arg(long, value_enum, default_value = "rust")]
    lang: Lang,
    /// Where to create it (default: a new folder NAME here).
    #[arg(long)]
    dir: Option<PathBuf>,
    /// The `raft-guest` crate (guest-sdk) the project builds against
    /// (default: the one in the source tree this raft-host was built from).
    #[arg(long)]
    sdk: Option<PathBuf>,
}

/// The Rust template: (path in the project, contents).
const RUST: &[(&str, &str)] = &[
    ("Cargo.toml", include_str!("../../../guests/templates/rust/Cargo.toml.template")),
    // The versions the repository's own guests are built and tested with.
    ("Cargo.lock", include_str!("../../../guests/templates/rust/Cargo.lock.template")),
    ("src/lib.rs", include_str!("../../../guests/templates/rust/src/lib.rs")),
    ("README.md", include_str!("../../../guests/templates/rust/README.md")),
    ("wit/raft-host.wit", include_str!("../../../wit/raft-host.wit")),
    (".gitignore", "/target\n"),
];

/// Runs `raft-host new`.
pub fn new(args: NewArgs) -> anyhow::Result<()> {
    let name = &args.name;
    let valid = !name.is_empty()
        && name.len() <= 64
        && name.starts_with(|c: char| c.is_ascii_lowercase())
        && name.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-');
    if !valid {
        bail!(
            "{name:?} is not a project name: use lowercase letters, digits and dashes (at most 64), starting with a letter"
        );
    }
    let dir = args.dir.clone().unwrap_or_else(|| PathBuf::from(name));
    if dir.exists() && std::fs::read_dir(&dir).map(|mut d| d.next().is_some()).unwrap_or(true) {
        bail!("{} already exists and is not empty; choose another --dir", dir.display());
    }
    let sdk = match &args.sdk {
        Some(sdk) => sdk.clone(),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("../guest-sdk"),
    };
    let sdk = sdk.canonicalize().with_context(|| {
        format!("the raft-guest crate is not at {}; give its folder (guest-sdk) with --sdk", sdk.display())
    })?;
    if !sdk.join("Cargo.toml").exists() {
        bail!("{} holds no Cargo.toml; --sdk names the raft-guest crate's folder (guest-sdk)", sdk.display());
    }
    let files = match args.lang {
        Lang::Rust => RUST,
    };
    let crate_stem = name.replace('-', "_");
    for (path, template) in files {
        let text = template
            .replace("{{name}}", name)
            .replace("{{crate}}", &crate_stem)
            .replace("{{sdk}}", &sdk.display().to_string());
        let target = dir.join(path);
        if let Some(parent) = target.parent() {
            std::fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
        }
        std::fs::write(&target, text).with_context(|| format!("writing {}", target.display()))?;
    }
    println!("created {} ({name}, Rust); next:", dir.display());
    println!("  cd {} && cargo test && cargo build --release --target wasm32-wasip2", dir.display());
    println!("  raft-host run target/wasm32-wasip2/release/{crate_stem}.wasm --sm {name} < commands.jsonl");
    println!("  raft-host deploy --name {name} target/wasm32-wasip2/release/{crate_stem}.wasm");
    Ok(())
}
