//! The PKCS#11 key-encryption key against a real SoftHSM2 token made in a temporary directory:
//! wrap/unwrap, the namespace binding, the key's attributes read back from the token, and the
//! errors an operator meets (wrong PIN, missing token, module or key, an extractable key).
//!
//! SoftHSM2 reads `SOFTHSM2_CONF` once, when the module is initialized, and the gateway
//! initializes a module once per process, so everything runs in one test function against one
//! token. Skipped with a message when `libsofthsm2.so` is absent, except under `CI=true`
//! (`scripts/setup.sh` installs it), where its absence fails the test.

use std::path::{Path, PathBuf};
use std::process::Command;

use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::mechanism::Mechanism;
use cryptoki::object::{Attribute, AttributeType};
use cryptoki::session::UserType;
use cryptoki::types::AuthPin;
use payload_gateway::kms::pkcs11::{Pkcs11Kek, WRAPPED_LEN};
use payload_gateway::kms::{Dek, KeyEncryptionKey, KmsError, Provider};

const TOKEN: &str = "pgw-test";
const PIN: &str = "4321-user";
const SO_PIN: &str = "8765-so";

fn softhsm_module() -> Option<PathBuf> {
    let path = std::env::var_os("PGW_SOFTHSM_MODULE")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/usr/lib/softhsm/libsofthsm2.so"));
    if path.is_file() {
        return Some(path);
    }
    assert!(
        std::env::var("CI").as_deref() != Ok("true"),
        "{} is missing under CI=true: scripts/setup.sh installs softhsm2",
        path.display()
    );
    eprintln!(
        "SKIPPED: {} is absent (apt-get install softhsm2 opensc, or run scripts/setup.sh)",
        path.display()
    );
    None
}

fn run(cmd: &mut Command) {
    let out = cmd.output().expect("run tool");
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn write_private(path: &Path, text: &str) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::write(path, text).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).unwrap();
}

fn uri(module: &Path, path_attrs: &str, pin_file: &Path) -> String {
    format!(
        "pkcs11:{path_attrs}?module-path={}&pin-source=file:{}",
        module.display(),
        pin_file.display()
    )
}

fn dek(byte: u8) -> Dek {
    Dek::from_slice(&[byte; 32]).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pkcs11_kek_against_softhsm2() {
    let Some(module) = softhsm_module() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let tokens = dir.path().join("tokens");
    std::fs::create_dir(&tokens).unwrap();
    let conf = dir.path().join("softhsm2.conf");
    std::fs::write(
        &conf,
        format!(
            "directories.tokendir = {}\nobjectstore.backend = file\nlog.level = ERROR\n",
            tokens.display()
        ),
    )
    .unwrap();
    // SAFETY: this binary runs this one test; nothing else reads the environment concurrently.
    unsafe { std::env::set_var("SOFTHSM2_CONF", &conf) };
    run(Command::new("softhsm2-util").args([
        "--init-token",
        "--free",
        "--label",
        TOKEN,
        "--pin",
        PIN,
        "--so-pin",
        SO_PIN,
    ]));
    // The KEK as the README tells an operator to make it.
    run(Command::new("pkcs11-tool").args([
        "--module",
        module.to_str().unwrap(),
        "--token-label",
        TOKEN,
        "--login",
        "--pin",
        PIN,
        "--keygen",
        "--key-type",
        "AES:32",
        "--label",
        "kek",
        "--id",
        "01",
        "--sensitive",
        "--private",
    ]));
    let pin_file = dir.path().join("pin");
    write_private(&pin_file, &format!("{PIN}\n"));
    let wrong_pin_file = dir.path().join("wrong-pin");
    write_private(&wrong_pin_file, "0000\n");

    // A wrong PIN first: once the process is logged in, PKCS#11 answers a second login with
    // "already logged in" without looking at the PIN.
    let err = Pkcs11Kek::open(
        "hsm",
        &uri(
            &module,
            &format!("token={TOKEN};object=kek"),
            &wrong_pin_file,
        ),
    )
    .unwrap_err();
    assert!(matches!(err, KmsError::Refused { .. }), "{err}");
    assert!(err.to_string().contains("refused the PIN"), "{err}");
    assert!(!err.to_string().contains("0000"), "the PIN leaked: {err}");

    let err = Pkcs11Kek::open(
        "hsm",
        &format!(
            "pkcs11:token={TOKEN};object=kek?module-path={}&pin-source=env:PGW_TEST_NO_SUCH_PIN_VAR",
            module.display()
        ),
    )
    .unwrap_err();
    assert!(matches!(err, KmsError::Config { .. }), "{err}");
    assert!(
        err.to_string().contains("PGW_TEST_NO_SUCH_PIN_VAR"),
        "{err}"
    );

    // An absent token is not a configuration error: the gateway starts degraded and opens
    // it on use (RELIABILITY.md, "Start degraded"); opening it now says it is unavailable.
    let err = Pkcs11Kek::open(
        "hsm",
        &uri(&module, "token=no-such-token;object=kek", &pin_file),
    )
    .unwrap_err();
    assert!(matches!(err, KmsError::Unavailable { .. }), "{err}");
    let text = err.to_string();
    assert!(
        text.contains("no-such-token") && text.contains(TOKEN),
        "{text}"
    );

    let err = Pkcs11Kek::open(
        "hsm",
        &uri(
            Path::new("/nonexistent/libpkcs11.so"),
            "token=t;object=kek",
            &pin_file,
        ),
    )
    .unwrap_err();
    assert!(matches!(err, KmsError::Config { .. }), "{err}");
    assert!(
        err.to_string().contains("/nonexistent/libpkcs11.so"),
        "{err}"
    );

    let err = Pkcs11Kek::open(
        "hsm",
        &uri(&module, &format!("token={TOKEN};object=nokey"), &pin_file),
    )
    .unwrap_err();
    assert!(matches!(err, KmsError::Config { .. }), "{err}");
    assert!(err.to_string().contains("nokey"), "{err}");

    // An independent look at the token: the key is sensitive and not extractable, its value
    // cannot be read, and an extractable key is refused as a KEK.
    let ctx = Pkcs11::new(&module).unwrap();
    match ctx.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK)) {
        Ok(())
        | Err(cryptoki::error::Error::Pkcs11(
            cryptoki::error::RvError::CryptokiAlreadyInitialized,
            _,
        )) => {}
        Err(e) => panic!("initialize: {e}"),
    }
    let slot = ctx
        .get_slots_with_token()
        .unwrap()
        .into_iter()
        .find(|s| ctx.get_token_info(*s).unwrap().label() == TOKEN)
        .unwrap();
    let session = ctx.open_rw_session(slot).unwrap();
    session
        .login(UserType::User, Some(&AuthPin::from(PIN.to_owned())))
        .unwrap();
    let kek = session
        .find_objects(&[Attribute::Label(b"kek".to_vec())])
        .unwrap();
    assert_eq!(kek.len(), 1);
    let attrs = session
        .get_attributes(
            kek[0],
            &[AttributeType::Sensitive, AttributeType::Extractable],
        )
        .unwrap();
    assert!(attrs.contains(&Attribute::Sensitive(true)), "{attrs:?}");
    assert!(attrs.contains(&Attribute::Extractable(false)), "{attrs:?}");
    let value = session
        .get_attributes(kek[0], &[AttributeType::Value])
        .unwrap();
    assert!(
        !value.iter().any(|a| matches!(a, Attribute::Value(_))),
        "the KEK's value was readable: {} attributes",
        value.len()
    );
    session
        .generate_key(
            &Mechanism::AesKeyGen,
            &[
                Attribute::Token(true),
                Attribute::Private(true),
                Attribute::Label(b"weak".to_vec()),
                Attribute::ValueLen(32.into()),
                Attribute::Sensitive(true),
                Attribute::Extractable(true),
                Attribute::Encrypt(true),
                Attribute::Decrypt(true),
            ],
        )
        .unwrap();
    drop(session);

    let err = Pkcs11Kek::open(
        "hsm",
        &uri(&module, &format!("token={TOKEN};object=weak"), &pin_file),
    )
    .unwrap_err();
    assert!(matches!(err, KmsError::Config { .. }), "{err}");
    assert!(err.to_string().contains("CKA_EXTRACTABLE is true"), "{err}");

    // Wrap and unwrap on the token.
    let kek = Pkcs11Kek::open(
        "hsm",
        &uri(
            &module,
            &format!("token={TOKEN};object=kek;id=%01;type=secret-key"),
            &pin_file,
        ),
    )
    .unwrap();
    assert_eq!(kek.key_id(), "hsm");
    assert_eq!(kek.provider(), Provider::Pkcs11);
    let wrapped = kek.wrap(&dek(7), "payments").await.unwrap();
    assert_eq!(wrapped.len(), WRAPPED_LEN);
    assert!(
        !wrapped.windows(32).any(|w| w == [7u8; 32]),
        "the wrapped key holds the data key in the clear"
    );
    let again = kek.wrap(&dek(7), "payments").await.unwrap();
    assert_ne!(
        wrapped, again,
        "two wraps of one key must differ (random IV)"
    );
    assert_eq!(
        kek.unwrap(&wrapped, "payments").await.unwrap().expose(),
        &[7u8; 32]
    );
    assert_eq!(
        kek.unwrap(&again, "payments").await.unwrap().expose(),
        &[7u8; 32]
    );

    // The namespace binding: the token's tag check fails for another namespace.
    let err = kek.unwrap(&wrapped, "billing").await.unwrap_err();
    assert!(matches!(err, KmsError::Invalid { .. }), "{err}");
    for i in [0, 1, 20, WRAPPED_LEN - 1] {
        let mut tampered = wrapped.clone();
        tampered[i] ^= 0x40;
        let err = kek.unwrap(&tampered, "payments").await.unwrap_err();
        assert!(matches!(err, KmsError::Invalid { .. }), "byte {i}: {err}");
    }
    let err = kek.unwrap(&wrapped[..40], "payments").await.unwrap_err();
    assert!(matches!(err, KmsError::Invalid { .. }), "{err}");

    // A second handle on the same key (a configuration reload) shares the module and reads
    // what the first wrapped; concurrent calls beyond the session pool all complete.
    let reloaded = Pkcs11Kek::open(
        "hsm",
        &uri(&module, &format!("token={TOKEN};object=kek"), &pin_file),
    )
    .unwrap();
    drop(kek);
    let mut calls = Vec::new();
    for i in 0..24u8 {
        let kek = reloaded.clone();
        let wrapped = wrapped.clone();
        calls.push(tokio::spawn(async move {
            let ns = format!("ns-{i}");
            let mine = kek.wrap(&dek(i), &ns).await.unwrap();
            assert_eq!(kek.unwrap(&mine, &ns).await.unwrap().expose(), &[i; 32]);
            assert_eq!(
                kek.unwrap(&wrapped, "payments").await.unwrap().expose(),
                &[7u8; 32]
            );
        }));
    }
    for call in calls {
        call.await.unwrap();
    }
}
