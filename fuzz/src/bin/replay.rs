//! Runs saved inputs through a target without AFL++: `replay <target>
//! <file|dir>…`. A crash shows its panic message and backtrace and exits
//! non-zero; otherwise it says how many inputs ran. `replay list` lists
//! the targets.

use std::path::{Path, PathBuf};

fn main() {
    let mut args = std::env::args().skip(1);
    let name = args.next().unwrap_or_default();
    let Some(target) = botline_fuzz::target(&name) else {
        for target in botline_fuzz::TARGETS {
            println!("{:<18} {}", target.name, target.input);
        }
        if name == "list" {
            return;
        }
        eprintln!("usage: replay <target> <file|dir>…");
        std::process::exit(2);
    };
    let mut files = Vec::new();
    for arg in args {
        collect(Path::new(&arg), &mut files);
    }
    for file in &files {
        let data =
            std::fs::read(file).unwrap_or_else(|error| panic!("{}: {error}", file.display()));
        eprintln!("{}: {}", target.name, file.display());
        (target.run)(&data);
    }
    println!("{}: {} inputs, no crash", target.name, files.len());
}

/// `path`, or the files in it (not hidden ones, not recursively), sorted.
fn collect(path: &Path, files: &mut Vec<PathBuf>) {
    if path.is_dir() {
        let mut entries: Vec<PathBuf> = std::fs::read_dir(path)
            .unwrap_or_else(|error| panic!("{}: {error}", path.display()))
            .filter_map(|entry| entry.ok().map(|entry| entry.path()))
            .filter(|entry| entry.is_file())
            .filter(|entry| {
                !entry
                    .file_name()
                    .is_some_and(|name| name.to_string_lossy().starts_with('.'))
            })
            .collect();
        entries.sort();
        files.extend(entries);
    } else {
        files.push(path.to_path_buf());
    }
}
