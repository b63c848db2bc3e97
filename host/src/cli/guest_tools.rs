//! `raft-host bindings` and `raft-host componentize`: what a guest author in
//! C or C++ needs besides a compiler, from the same WIT this raft-host
//! speaks, without installing wit-bindgen's or wasm-tools' command lines.

use anyhow::{Context, bail};
use clap::{Args, ValueEnum};
use std::path::PathBuf;

/// The contract every guest implements (what `raft-host new` copies too).
const WIT: &str = include_str!("../../../wit/raft-host.wit");
const WORLD: &str = "state-machine";

#[derive(Clone, Copy, ValueEnum)]
enum BindingsLang {
    /// wit-bindgen's C generator; the files also serve C++.
    C,
}

#[derive(Args)]
pub struct BindingsArgs {
    /// The language of the bindings.
    #[arg(long, value_enum, default_value = "c")]
    lang: BindingsLang,
    /// The folder to write them to (made if missing).
    #[arg(long, default_value = ".")]
    out: PathBuf,
    /// A WIT file or folder holding the raft:host package (default: the
    /// contract this raft-host speaks).
    #[arg(long)]
    wit: Option<PathBuf>,
}

#[derive(Args)]
pub struct ComponentizeArgs {
    /// The core WebAssembly module (a wasm32-wasi reactor linked with the
    /// bindings' `state_machine_component_type.o`).
    module: PathBuf,
    /// Where to write the component.
    #[arg(long, short)]
    out: PathBuf,
}

/// The state-machine world, from `wit` or from the built-in contract.
fn world_from(wit: Option<&std::path::Path>) -> anyhow::Result<(wit_parser::Resolve, wit_parser::WorldId)> {
    let mut resolve = wit_parser::Resolve::default();
    let package = match wit {
        Some(path) => resolve.push_path(path).with_context(|| format!("parsing {}", path.display()))?.0,
        None => resolve.push_str("raft-host.wit", WIT).context("parsing the built-in WIT")?,
    };
    let world = resolve.select_world(&[package], Some(WORLD)).context("finding the state-machine world")?;
    Ok((resolve, world))
}

/// wit-bindgen's C bindings for the state-machine world of `wit` (default:
/// the built-in contract).
fn c_bindings(wit: Option<&std::path::Path>) -> anyhow::Result<wit_bindgen_core::Files> {
    let (mut resolve, world) = world_from(wit)?;
    let mut files = wit_bindgen_core::Files::default();
    wit_bindgen_c::Opts::default().build().generate(&mut resolve, world, &mut files)?;
    Ok(files)
}

/// Runs `raft-host bindings`.
pub fn bindings(args: BindingsArgs) -> anyhow::Result<()> {
    let files = match args.lang {
        BindingsLang::C => c_bindings(args.wit.as_deref())?,
    };
    std::fs::create_dir_all(&args.out).with_context(|| format!("creating {}", args.out.display()))?;
    for (name, contents) in files.iter() {
        let path = args.out.join(name);
        std::fs::write(&path, contents).with_context(|| format!("writing {}", path.display()))?;
        println!("{}", path.display());
    }
    Ok(())
}

/// Runs `raft-host componentize`.
pub fn componentize(args: ComponentizeArgs) -> anyhow::Result<()> {
    let module = std::fs::read(&args.module).with_context(|| format!("reading {}", args.module.display()))?;
    let component = component_of(&module).with_context(|| format!("componentizing {}", args.module.display()))?;
    std::fs::write(&args.out, &component).with_context(|| format!("writing {}", args.out.display()))?;
    println!("{} ({} bytes)", args.out.display(), component.len());
    Ok(())
}

/// Wraps a core module into a component of the state-machine world. A module
/// without the bindings' type section gets the world embedded first; one that
/// imports WASI preview 1 (printf, iostream, files) is refused with the
/// import named, since the host gives guests no preview-1 adapter.
fn component_of(module: &[u8]) -> anyhow::Result<Vec<u8>> {
    if wasmparser::Parser::is_component(module) {
        bail!("this is already a component; give the core module the compiler wrote");
    }
    let shape = module_shape(module)?;
    if let Some(import) = shape.preview1_import {
        bail!(
            "the module imports {import} (WASI preview 1): a guest may import only raft:host's interfaces; \
             leave out stdio, files and clocks of the C library (no printf, no iostream), \
             or log through raft_host_context_log"
        );
    }
    let mut module = module.to_vec();
    if !shape.has_component_type {
        let (resolve, world) = world_from(None)?;
        wit_component::embed_component_metadata(
            &mut module,
            &resolve,
            world,
            wit_component::StringEncoding::UTF8,
            false,
        )
        .context("embedding the world")?;
    }
    wit_component::ComponentEncoder::default()
        .module(&module)
        .context("reading the module's imports and exports")?
        .validate(true)
        .encode()
        .context("the module does not implement the state-machine world")
}

/// What `component_of` needs to know of a core module, from one read of it.
struct ModuleShape {
    /// Its first WASI preview 1 import, as `module::name`.
    preview1_import: Option<String>,
    /// Whether it carries a world (the bindings' `component-type` section).
    has_component_type: bool,
}

fn module_shape(module: &[u8]) -> anyhow::Result<ModuleShape> {
    let mut shape = ModuleShape { preview1_import: None, has_component_type: false };
    for payload in wasmparser::Parser::new(0).parse_all(module) {
        match payload.context("not a WebAssembly module")? {
            wasmparser::Payload::ImportSection(imports) => {
                for import in imports.into_imports() {
                    let import = import.context("not a WebAssembly module")?;
                    let preview1 = import.module.starts_with("wasi_snapshot_preview1")
                        || import.module.starts_with("wasi_unstable");
                    if preview1 && shape.preview1_import.is_none() {
                        shape.preview1_import = Some(format!("{}::{}", import.module, import.name));
                    }
                }
            }
            wasmparser::Payload::CustomSection(section) if section.name().starts_with("component-type") => {
                shape.has_component_type = true;
            }
            _ => {}
        }
    }
    Ok(shape)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bindings_are_generated_from_the_built_in_world() {
        let files = c_bindings(None).expect("bindings");
        let names: Vec<&str> = files.iter().map(|(name, _)| name).collect();
        assert!(names.contains(&"state_machine.h") && names.contains(&"state_machine.c"), "{names:?}");
        assert!(names.contains(&"state_machine_component_type.o"), "{names:?}");
    }

    #[test]
    fn what_is_not_a_guest_module_is_refused_with_a_reason() {
        let error = component_of(b"not wasm").expect_err("not wasm");
        assert!(format!("{error:#}").contains("not a WebAssembly module"), "{error:#}");
        // A module importing WASI preview 1, as printf makes clang's output do.
        let error = component_of(&module_importing("wasi_snapshot_preview1", "fd_write")).expect_err("preview 1");
        assert!(format!("{error:#}").contains("wasi_snapshot_preview1::fd_write"), "{error:#}");
        // A module that exports none of the world's functions.
        let error = component_of(&wasm_encoder::Module::new().finish()).expect_err("empty");
        assert!(format!("{error:#}").contains("does not implement"), "{error:#}");
    }

    fn module_importing(module: &str, name: &str) -> Vec<u8> {
        let mut types = wasm_encoder::TypeSection::new();
        types.ty().function([], []);
        let mut imports = wasm_encoder::ImportSection::new();
        imports.import(module, name, wasm_encoder::EntityType::Function(0));
        let mut encoded = wasm_encoder::Module::new();
        encoded.section(&types).section(&imports);
        encoded.finish()
    }
}
