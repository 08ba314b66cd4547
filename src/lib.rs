//! lorafs: a base model plus LoRA adapters, served as if they had been merged.
//!
//! The core (this crate minus [`fuse`]) knows nothing of FUSE: [`model`] and [`layout`] read
//! the base, [`adapter`] the adapters, [`plan`] decides what changes, [`kernel`] computes it,
//! [`cache`] keeps merged blocks and factors, [`engine`] holds what every view of one base
//! shares, and [`view`] serves any byte range of one merged directory. [`materialize`]
//! writes a view out; [`fuse`] mounts views, in the tree of [`tree`]. [`catalog`] finds
//! and watches the adapter directories of a tree, and [`control`] lets `lorafs view` change
//! the views of a mount while it serves.

pub mod adapter;
pub mod ahead;
pub mod aligned;
pub mod args;
pub mod cache;
pub mod catalog;
pub mod control;
pub mod dora;
pub mod dtype;
pub mod engine;
pub mod error;
pub mod gguf;
pub mod inspect;
pub mod kernel;
pub mod layout;
pub mod materialize;
pub mod model;
pub mod mountinfo;
pub mod plan;
pub mod quant;
pub mod residency;
pub mod sd_notify;
pub mod stats;
pub mod tree;
pub mod view;
pub mod viewsfile;

pub use engine::{Engine, EngineOptions};
pub use error::{Error, Result};
pub use view::View;
pub mod baseio;
pub mod fuse;
pub mod hub;
