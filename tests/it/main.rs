//! Integration tests, one module per topic; they share the synthetic-model helpers.

mod cli;
mod common;
mod control;
mod errors;
mod features;
mod gguf;
mod guarantees;
mod hostile;
mod inputs;
mod merge;
mod mount;
mod mount_trust;
mod output;
mod read_at;
mod system;
mod transport;
mod views;
mod views_file;
