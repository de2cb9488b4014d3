//! The examples' integration tests, one binary: each module is a former test file.

mod demo;
mod monitoring;
mod orders;
