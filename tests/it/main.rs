//! Integration tests, one module per topic; they share the synthetic-model helpers.

mod common;
mod errors;
mod features;
mod merge;
mod mount;
mod output;
mod read_at;
