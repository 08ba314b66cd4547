//! Mounted tests: added with the FUSE layer.
