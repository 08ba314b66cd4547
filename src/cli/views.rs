//! Mounts and plans of views: `--view`, `--views FILE` and `--catalog`.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context;

use lorafs::args::resolve_adapters;
use lorafs::View;

use super::args::*;

/// A mount of views: the engine, an empty tree, and the registry with the `--view` views
/// in it (each checked in full: a bad one mounts nothing). `reads`: as for
/// `open_filesystem` (the engine prepares its read-ahead buffers).
pub(crate) fn open_views(
    inputs: &MergeArgs,
    args: &ViewArgs,
    mountpoint: &Path,
    warm: Warm,
    reads: bool,
) -> anyhow::Result<(lorafs::fuse::LorafsFs, lorafs::fuse::Live)> {
    use lorafs::control::{ViewSource, ViewSpec};
    use lorafs::fuse::views::Views;
    if !inputs.adapters.is_empty() {
        anyhow::bail!(
            "--adapter merges one model at the mount point, --view and --catalog serve views \
             under it: use one or the other (--adapter A --adapter B is --view NAME=A,B)"
        );
    }
    // Read once before the base is opened, so a mistake in it is the error shown.
    if let Some(path) = &args.views_file {
        lorafs::viewsfile::load(path).map_err(anyhow::Error::msg)?;
    }
    let mut engine = inputs.engine(MOUNT_CACHE, reads)?;
    engine.factors = lorafs::cache::Cache::new(args.factor_cache);
    let engine = Arc::new(engine);
    let fs = lorafs::fuse::LorafsFs::of_views(engine.clone())?;
    // Each view is about the base's size: warm one when first opened if that fits.
    let warm = warm.wanted(!inputs.gguf.is_empty(), engine.base_bytes());
    let views = Arc::new(
        Views::new(engine, inputs.dtype, fs.tree(), warm)
            .with_gguf(&inputs.gguf)
            .with_combine(inputs.combine()?),
    );
    fs.attach(views.clone());
    for (name, spec) in &args.views {
        let adapters = resolve_adapters(spec).with_context(|| format!("view {name}"))?;
        let view = (views.open(&ViewSpec::of_adapters(adapters), &ViewSource::Named))
            .map_err(|e| anyhow::anyhow!("view {name}: {e}"))?;
        let name = Path::new(name);
        views
            .insert(name, view, ViewSource::Named)
            .map_err(|e| anyhow::anyhow!("view {}: {e}", name.display()))?;
    }
    let file = match &args.views_file {
        Some(path) => {
            Some(lorafs::viewsfile::FileSync::open(path, &*views).map_err(anyhow::Error::msg)?)
        }
        None => None,
    };
    let catalog = match &args.catalog {
        Some(dir) => Some(open_catalog(dir, mountpoint, &views)?),
        None => None,
    };
    let registry = views.clone();
    let start = Box::new(move || {
        let mut services: lorafs::fuse::Services = Vec::new();
        if let Some(file) = file {
            let watcher = lorafs::viewsfile::watch(file, registry.clone())?;
            services.push(Box::new(watcher));
        }
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
        if views.origin(&f.name) == Some(lorafs::control::ViewSource::File) {
            anyhow::bail!(
                "catalog {}: {} is also a view of the views file; rename one of them",
                root.display(),
                f.name.display()
            );
        }
    }
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
    let engine = Arc::new(inputs.engine(0, false)?);
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
    if let Some(path) = &args.views_file {
        for (name, spec) in lorafs::viewsfile::load(path).map_err(anyhow::Error::msg)? {
            let name = name.display().to_string();
            let gguf = spec.gguf.as_deref().unwrap_or(&inputs.gguf);
            let dtype = spec.dtype.or(inputs.dtype);
            let combine = spec.combine.as_ref().or(combine);
            let view = View::open(engine.clone(), &spec.adapters, dtype, combine)
                .and_then(|view| view.realize_all().map(|()| view))
                .and_then(|mut view| view.add_gguf(gguf).map(|()| view))
                .with_context(|| format!("views file {}: view {name}", path.display()))?;
            if views.iter().any(|(n, _)| *n == name) {
                anyhow::bail!(
                    "view {name} is both a --view and in the views file {}",
                    path.display()
                );
            }
            views.push((name, view));
        }
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
