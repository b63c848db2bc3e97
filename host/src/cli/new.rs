//! `raft-host new`: a ready-to-build guest project from the templates kept
//! in `guests/templates` (built and tested with the workspace's tests).

use anyhow::{Context, bail};
use clap::{Args, ValueEnum};
use std::path::{Path, PathBuf};

#[derive(Clone, Copy, ValueEnum)]
enum Lang {
    Rust,
    Python,
    Js,
    C,
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
    /// For Rust: the `raft-guest` crate (guest-sdk) the project builds
    /// against (default: the one in the source tree this raft-host was
    /// built from).
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

/// The Python template (componentize-py); its tests run with `python3 -m
/// unittest`, against a host in memory.
const PYTHON: &[(&str, &str)] = &[
    ("app.py", include_str!("../../../guests/templates/python/app.py")),
    ("test_app.py", include_str!("../../../guests/templates/python/test_app.py")),
    ("requirements.txt", include_str!("../../../guests/templates/python/requirements.txt")),
    ("build.sh", include_str!("../../../guests/templates/python/build.sh")),
    ("README.md", include_str!("../../../guests/templates/python/README.md")),
    ("wit/raft-host.wit", include_str!("../../../wit/raft-host.wit")),
    (".gitignore", include_str!("../../../guests/templates/python/gitignore")),
];

/// The JavaScript template (componentize-qjs); its tests run with `node
/// --test`, against a host in memory. utf8.js and the lock file are the
/// JavaScript counter's: one pinned toolchain for both.
const JS: &[(&str, &str)] = &[
    ("app.js", include_str!("../../../guests/templates/js/app.js")),
    ("utf8.js", include_str!("../../../guests/js-counter/utf8.js")),
    ("app.test.js", include_str!("../../../guests/templates/js/app.test.js")),
    ("test_host.js", include_str!("../../../guests/templates/js/test_host.js")),
    ("package.json", include_str!("../../../guests/templates/js/package.json")),
    ("package-lock.json", include_str!("../../../guests/js-counter/package-lock.json")),
    ("README.md", include_str!("../../../guests/templates/js/README.md")),
    ("wit/raft-host.wit", include_str!("../../../wit/raft-host.wit")),
    (".gitignore", include_str!("../../../guests/templates/js/gitignore")),
];

/// The package name in the JavaScript counter's lock file, which becomes
/// the project's.
const JS_COUNTER_PACKAGE: &str = "\"raft-host-js-counter\"";

/// The C template (clang for wasm32-wasi, `raft-host bindings` and
/// `componentize`); `make test` runs its tests natively against a host in
/// memory. json.c is the C kv guest's own.
const C: &[(&str, &str)] = &[
    ("app.c", include_str!("../../../guests/templates/c/app.c")),
    ("json.c", include_str!("../../../guests/c-kv/json.c")),
    ("json.h", include_str!("../../../guests/c-kv/json.h")),
    ("test_app.c", include_str!("../../../guests/templates/c/test_app.c")),
    ("test_host.c", include_str!("../../../guests/templates/c/test_host.c")),
    ("test_host.h", include_str!("../../../guests/templates/c/test_host.h")),
    ("Makefile", include_str!("../../../guests/templates/c/Makefile")),
    ("README.md", include_str!("../../../guests/templates/c/README.md")),
    ("wit/raft-host.wit", include_str!("../../../wit/raft-host.wit")),
    (".gitignore", include_str!("../../../guests/templates/c/gitignore")),
];

/// Files of a template that are run, not read.
const EXECUTABLES: &[&str] = &["build.sh"];

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
    let (files, sdk) = match args.lang {
        Lang::Rust => (RUST, rust_sdk(args.sdk.as_deref())?.display().to_string()),
        Lang::Python => (PYTHON, String::new()),
        Lang::Js => (JS, String::new()),
        Lang::C => (C, String::new()),
    };
    let crate_stem = name.replace('-', "_");
    for (path, template) in files {
        let text = template
            .replace(JS_COUNTER_PACKAGE, "\"{{name}}\"")
            .replace("{{name}}", name)
            .replace("{{crate}}", &crate_stem)
            .replace("{{sdk}}", &sdk);
        let target = dir.join(path);
        if let Some(parent) = target.parent() {
            std::fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
        }
        std::fs::write(&target, text).with_context(|| format!("writing {}", target.display()))?;
        if EXECUTABLES.contains(path) {
            use std::os::unix::fs::PermissionsExt as _;
            std::fs::set_permissions(&target, std::fs::Permissions::from_mode(0o755))
                .with_context(|| format!("making {} executable", target.display()))?;
        }
    }
    let (language, test, build, component) = match args.lang {
        Lang::Rust => (
            "Rust",
            "cargo test",
            "cargo build --release --target wasm32-wasip2",
            format!("target/wasm32-wasip2/release/{crate_stem}.wasm"),
        ),
        Lang::Python => ("Python", "python3 -m unittest", "./build.sh", format!("{name}.wasm")),
        Lang::Js => ("JavaScript", "npm test", "npm ci && npm run build", format!("{name}.wasm")),
        Lang::C => ("C", "make test", "make", format!("{name}.wasm")),
    };
    println!("created {} ({name}, {language}); next:", dir.display());
    println!("  cd {} && {test} && {build}", dir.display());
    println!("  raft-host run {component} --sm {name} < commands.jsonl");
    println!("  raft-host deploy --name {name} {component}");
    Ok(())
}

/// The raft-guest crate a Rust project builds against: `--sdk`, or the one
/// in the source tree this binary was built from.
fn rust_sdk(given: Option<&Path>) -> anyhow::Result<PathBuf> {
    let sdk = given.map_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../guest-sdk"), Path::to_path_buf);
    let sdk = sdk.canonicalize().with_context(|| {
        format!("the raft-guest crate is not at {}; give its folder (guest-sdk) with --sdk", sdk.display())
    })?;
    if !sdk.join("Cargo.toml").exists() {
        bail!("{} holds no Cargo.toml; --sdk names the raft-guest crate's folder (guest-sdk)", sdk.display());
    }
    Ok(sdk)
}
