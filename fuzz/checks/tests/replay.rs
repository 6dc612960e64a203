//! Replays the committed corpora (`fuzz/corpus/TARGET/*`) through the fuzz checks: every
//! input a campaign kept, and every crash found and fixed, stays a regression test.

use std::path::{Path, PathBuf};

fn fuzz_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The files of `dir/TARGET/`, sorted (no directory is no files).
fn inputs(dir: &Path, target: &str) -> Vec<PathBuf> {
    let Ok(rd) = std::fs::read_dir(dir.join(target)) else { return Vec::new() };
    let mut v: Vec<PathBuf> = rd
        .map(|e| e.expect("read a corpus directory").path())
        .filter(|p| p.is_file() && !p.file_name().is_some_and(|n| n.to_string_lossy().starts_with('.')))
        .collect();
    v.sort();
    v
}

fn replay(dir: &Path) -> usize {
    let mut n = 0;
    for (target, check) in longhorn_fuzz_checks::TARGETS {
        for p in inputs(dir, target) {
            let data = std::fs::read(&p).expect("read a corpus file");
            eprintln!("{target}: {}", p.display());
            check(&data);
            n += 1;
        }
    }
    n
}

#[test]
fn corpora() {
    let dir = fuzz_dir().join("corpus");
    for (target, _) in longhorn_fuzz_checks::TARGETS {
        assert!(!inputs(&dir, target).is_empty(), "fuzz/corpus/{target} is empty");
    }
    let n = replay(&dir);
    println!("replayed {n} corpus inputs");
}

/// Reproducers of bugs reported and not fixed yet (fuzz/crashes-open/README.md), run
/// without skipping them: fails while any is open. After a fix, this passes and the
/// files move to fuzz/corpus/. Run: cargo test -p longhorn-fuzz-checks -- --ignored
#[test]
#[ignore]
fn crashes_open() {
    longhorn_fuzz_checks::set_strict(true);
    let n = replay(&fuzz_dir().join("crashes-open"));
    println!("replayed {n} open-bug reproducers: none crashes any more");
}
