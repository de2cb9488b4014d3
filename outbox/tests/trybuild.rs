//! A test binary of its own: trybuild compiles each case as a crate of its own.
//!
//! The compile errors of `#[outbox::publish]`: every mistake it reports has a case in `tests/ui/`
//! with the diagnostics the compiler must print (`<case>.stderr`); `pass_*.rs` cases must build.

#[test]
fn ui() {
    let cases = trybuild::TestCases::new();
    let mut files: Vec<_> = std::fs::read_dir("tests/ui")
        .expect("tests/ui is readable")
        .map(|entry| entry.expect("tests/ui is readable").path())
        .filter(|path| path.extension().is_some_and(|ext| ext == "rs"))
        .collect();
    files.sort();
    for file in files {
        let passes = file
            .file_name()
            .is_some_and(|name| name.to_string_lossy().starts_with("pass_"));
        if passes {
            cases.pass(file);
        } else {
            cases.compile_fail(file);
        }
    }
}
