//! Guard: the top-level modules of every crate of the workspace form a DAG
//! (no module names a module that names it back, however indirectly). Test
//! code may import anything. On failure, each cycle is printed with the file
//! and line of every edge in it.

use std::path::Path;

use nightshift_tests::layering;

#[test]
fn the_top_level_modules_of_each_crate_form_no_import_cycle() {
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the tests crate sits in the workspace");
    let mut found = String::new();
    for krate in ["master", "agent", "proto", "policy"] {
        let src = workspace.join(krate).join("src");
        found.push_str(&layering::report(&src).expect("the crate's sources are readable"));
    }
    assert!(
        found.is_empty(),
        "import cycles between top-level modules (move the type a lower module needs \
         down, or pass a value or callback into it; see ARCHITECTURE.md, layers):\n{found}"
    );
}
