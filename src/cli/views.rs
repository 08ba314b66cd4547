//! Mounts and plans of views: `--view` and `--catalog`.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context;

use lorafs::args::resolve_adapters;
use lorafs::View;

use super::args::*;

/// A mount of views: the engine, an empty tree, and the registry with the `--view` views
/// in it (each checked in full: a bad one mounts nothing).
pub(crate) fn open_views(
    inputs: &MergeArgs,
    args: &ViewArgs,
    mountpoint: &Path,
    warm: Warm,
) -> anyhow::Result<(lorafs::fuse::LorafsFs, lorafs::fuse::Live)> {
    use lorafs::control::ViewSource;
    use lorafs::fuse::views::Views;
    if !inputs.adapters.is_empty() {
        anyhow::bail!(
            "--adapter merges one model at the mount point, --view and --catalog serve views \
             under it: use one or the other (--adapter A --adapter B is --view NAME=A,B)"
        );
    }
    let mut engine = inputs.engine(MOUNT_CACHE)?;
    engine.factors = lorafs::cache::Cache::new(args.factor_cache);
    let engine = Arc::new(engine);
    let fs = lorafs::fuse::LorafsFs::of_views(engine.clone())?;
    // Each view is about the base's size: warm one when first opened if that fits.
    let warm = match warm {
        Warm::Always => true,
        Warm::Never => false,
        // With --gguf, which format a loader reads is not known: see MountArgs::warm.
        Warm::Auto => {
            inputs.gguf.is_empty()
                && !engine.direct_base_reads
                && engine.base_bytes() <= total_ram() / 4
        }
    };
    let views = Arc::new(
        Views::new(engine, inputs.dtype, fs.tree(), warm)
            .with_gguf(&inputs.gguf)
            .with_combine(inputs.combine()?),
    );
    fs.attach(views.clone());
    for (name, spec) in &args.views {
        let view = resolve_adapters(spec)
            .and_then(|adapters| views.open(&adapters, &ViewSource::Named))
            .with_context(|| format!("view {name}"))?;
        let name = Path::new(name);
        views
            .insert(name, view, ViewSource::Named)
            .map_err(|e| anyhow::anyhow!("view {}: {e}", name.display()))?;
    }
    let catalog = match &args.catalog {
        Some(dir) => Some(open_catalog(dir, mountpoint, &views)?),
        None => None,
    };
    let registry = views.clone();
    let start = Box::new(move || {
        let mut services: Vec<Box<dyn std::any::Any>> = Vec::new();
        if let Some((root, found)) = catalog {
            let views = registry.clone();
            let watcher =
                lorafs::catalog::watch(&root, &found, move |event| views.catalog_event(event))?;
            services.push(Box::new(watcher));
        }
        Ok(services)
    });
    Ok((fs, lorafs::fuse::Live { views, start }))
}

/// The catalog at `dir`: its adapter directories found now, each added as a view (or
/// skipped with a log line). Returns its root and what was found, for the watcher.
pub(crate) fn open_catalog(
    dir: &Path,
    mountpoint: &Path,
    views: &lorafs::fuse::views::Views,
) -> anyhow::Result<(PathBuf, Vec<lorafs::catalog::Found>)> {
    let root = (dir.canonicalize()).with_context(|| format!("catalog {}", dir.display()))?;
    let mnt = mountpoint
        .canonicalize()
        .unwrap_or_else(|_| mountpoint.to_path_buf());
    if mnt.starts_with(&root) {
        anyhow::bail!(
            "the mount point {} is inside the catalog {}: the catalog would find the mount's \
             own views; mount elsewhere",
            mnt.display(),
            root.display()
        );
    }
    let found =
        lorafs::catalog::scan(&root).with_context(|| format!("catalog {}", root.display()))?;
    for f in &found {
        views.add_found(f);
    }
    log::info!(
        "catalog {}: {} adapter directories found",
        root.display(),
        found.len()
    );
    Ok((root, found))
}

/// The views `inspect` shows: each named view checked in full, as a mount would.
pub(crate) fn inspect_views(
    inputs: &MergeArgs,
    args: &ViewArgs,
) -> anyhow::Result<Vec<(String, View)>> {
    if !inputs.adapters.is_empty() {
        anyhow::bail!(
            "--adapter plans one model, --view and --catalog plan views: use one or the other"
        );
    }
    let engine = Arc::new(inputs.engine(0)?);
    let combine = inputs.combine()?;
    let combine = combine.as_ref();
    let mut views = Vec::new();
    for (name, spec) in &args.views {
        let view = resolve_adapters(spec)
            .and_then(|adapters| View::open(engine.clone(), &adapters, inputs.dtype, combine))
            .and_then(|view| view.realize_all().map(|()| view))
            .and_then(|mut view| view.add_gguf(&inputs.gguf).map(|()| view))
            .with_context(|| format!("view {name}"))?;
        views.push((name.clone(), view));
    }
    if let Some(dir) = &args.catalog {
        let root = dir
            .canonicalize()
            .with_context(|| format!("catalog {}", dir.display()))?;
        for found in lorafs::catalog::scan(&root)? {
            let name = found.name.display().to_string();
            let view = View::open(
                engine.clone(),
                &[(found.dir.clone(), 1.0)],
                inputs.dtype,
                combine,
            )
            .and_then(|view| view.realize_all().map(|()| view))
            .and_then(|mut view| view.add_gguf(&inputs.gguf).map(|()| view));
            match view {
                Ok(view) => views.push((name, view)),
                // As a mount does: a directory that is not a valid adapter is skipped.
                Err(e) => log::warn!("catalog: {} skipped: {e}", found.dir.display()),
            }
        }
    }
    Ok(views)
}

/// The input directories of a view (resolved), which an output must not touch.
pub(crate) fn inputs_of(view: &View) -> Vec<&Path> {
    std::iter::once(view.base_dir())
        .chain(view.plan.adapters.iter().map(|a| a.dir.as_path()))
        .collect()
}
