//! The blocking client (the CLI's) against a real blobstore process: a put and a
//! get through files, and what a caller sees for a missing, corrupt or badly
//! named blob (the destination never half written). The async client is driven
//! by the blobstore itself (copies to and repairs from its peer) in
//! integration/tests/blobstore.rs.

use std::fs;
use std::path::Path;
use std::process::Child;
use std::time::Duration;

use paddock_blob::{get_file_blocking, put_file_blocking, stat_blocking, BlobError};
use paddock_harness as harness;
use paddock_wire::Client;

struct Procs(Vec<Child>);

impl Drop for Procs {
    fn drop(&mut self) {
        for c in &mut self.0 {
            harness::stop_child(c, nix::sys::signal::Signal::SIGTERM, Duration::from_secs(3));
        }
    }
}

fn sha(d: &[u8]) -> String {
    ring::digest::digest(&ring::digest::SHA256, d)
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn listing(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

#[test]
fn put_and_get_through_files_and_clear_errors() {
    let t = tempfile::tempdir().unwrap();
    let state = t.path().join("state");
    let secret = paddock_wire::keyring::generate_secret_hex();
    let curve = harness::ClusterCurve::generate().unwrap();
    let (file, _) = harness::node_file(
        "node-a",
        &state,
        ("cluster-1", &secret),
        Some(&curve),
        &[],
        None,
    )
    .unwrap();
    let config = t.path().join("paddock.toml");
    file.write(&config).unwrap();
    let mut procs = Procs(Vec::new());
    for d in ["heartbeat", "blobstore"] {
        procs
            .0
            .push(harness::spawn_daemon(d, &config, &t.path().join(format!("{d}.log"))).unwrap());
    }
    let creds = harness::credentials(&file).unwrap();
    let rpc = file.daemons["blobstore"].rpc.clone();
    harness::wait_ping(&rpc, creds.clone(), Duration::from_secs(20)).unwrap();
    let mut c = Client::connect(&rpc, "user:test", creds).unwrap();

    let data: Vec<u8> = (0..1_500_000u32).map(|i| (i * 7 + i / 9) as u8).collect();
    let src = t.path().join("slug.tar.zst");
    fs::write(&src, &data).unwrap();
    let stored = put_file_blocking(&mut c, &src).unwrap();
    assert_eq!(stored.sha256, sha(&data));
    assert_eq!((stored.size, stored.copies), (data.len() as u64, 1));
    let st = stat_blocking(&mut c, &stored.sha256).unwrap();
    assert_eq!((st.present, st.size), (true, Some(data.len() as u64)));

    let out = t.path().join("out");
    fs::create_dir(&out).unwrap();
    let dest = out.join("got");
    assert_eq!(
        get_file_blocking(&mut c, &stored.sha256, &dest).unwrap(),
        data.len() as u64
    );
    assert_eq!(fs::read(&dest).unwrap(), data);
    assert_eq!(listing(&out), ["got"], "no temp file left");

    // Not stored anywhere: NotFound, nothing written.
    let missing = sha(b"never put");
    let e = get_file_blocking(&mut c, &missing, &out.join("missing")).unwrap_err();
    assert!(matches!(e, BlobError::NotFound { .. }), "{e}");
    assert!(e.to_string().contains("put it again"), "{e}");
    // Not a name at all: refused before anything is asked.
    let e = get_file_blocking(&mut c, "../../etc/passwd", &out.join("x")).unwrap_err();
    assert!(matches!(e, BlobError::BadName { .. }), "{e}");
    // The only copy corrupt: Corrupt, and the earlier good file left as it was.
    let stored_at = state
        .join("blobstore/blobs")
        .join(&stored.sha256[..2])
        .join(&stored.sha256);
    let mut bytes = fs::read(&stored_at).unwrap();
    bytes[12345] ^= 0xff;
    fs::write(&stored_at, &bytes).unwrap();
    let e = get_file_blocking(&mut c, &stored.sha256, &dest).unwrap_err();
    assert!(matches!(e, BlobError::Corrupt { .. }), "{e}");
    assert_eq!(
        fs::read(&dest).unwrap(),
        data,
        "the destination is untouched"
    );
    assert_eq!(listing(&out), ["got"], "no temp file left");
    // Putting it again replaces the corrupt copy (a commit trusts a present
    // copy only once its hash is right).
    let again = put_file_blocking(&mut c, &src).unwrap();
    assert_eq!(again, stored);
    assert_eq!(fs::read(&stored_at).unwrap(), data);
    get_file_blocking(&mut c, &stored.sha256, &dest).unwrap();
    assert_eq!(fs::read(&dest).unwrap(), data);
    drop(procs);
}
