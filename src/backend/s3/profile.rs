//! The AWS shared files, as AWS tools read them: `~/.aws/credentials` and `~/.aws/config` (or
//! `AWS_SHARED_CREDENTIALS_FILE`, `AWS_CONFIG_FILE`), profile `AWS_PROFILE` (default
//! `default`). What the environment sets wins; the files fill in the rest: keys (and a session
//! token), `region`, `endpoint_url`.

use std::collections::HashMap;
use std::path::PathBuf;

use object_store::aws::AmazonS3Builder;

/// What a profile gives.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Profile {
    pub access_key_id: Option<String>,
    pub secret_access_key: Option<String>,
    pub session_token: Option<String>,
    pub region: Option<String>,
    pub endpoint_url: Option<String>,
}

/// `builder` with what the profile gives and the environment does not.
pub fn apply(builder: AmazonS3Builder) -> Result<AmazonS3Builder, String> {
    let p = resolve(&|k| std::env::var(k).ok().filter(|v| !v.is_empty()))?;
    let mut b = builder;
    if let Some(v) = p.access_key_id {
        b = b.with_access_key_id(v);
    }
    if let Some(v) = p.secret_access_key {
        b = b.with_secret_access_key(v);
    }
    if let Some(v) = p.session_token {
        b = b.with_token(v);
    }
    if let Some(v) = p.region {
        b = b.with_region(v);
    }
    if let Some(v) = p.endpoint_url {
        b = b.with_endpoint(v);
    }
    Ok(b)
}

/// Sections of an INI file: name → key → value.
fn parse(text: &str) -> HashMap<String, HashMap<String, String>> {
    let mut out: HashMap<String, HashMap<String, String>> = HashMap::new();
    let mut section = None;
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            section = Some(name.trim().to_string());
            out.entry(name.trim().to_string()).or_default();
        } else if let (Some(s), Some((k, v))) = (&section, line.split_once('=')) {
            out.get_mut(s)
                .unwrap()
                .insert(k.trim().to_ascii_lowercase(), v.trim().to_string());
        }
    }
    out
}

/// The profile's settings that `env` leaves unset.
pub fn resolve(env: &dyn Fn(&str) -> Option<String>) -> Result<Profile, String> {
    let named = env("AWS_PROFILE");
    let name = named.clone().unwrap_or_else(|| "default".into());
    let home = env("HOME").map(PathBuf::from);
    let file = |var: &str, default: &str| {
        env(var)
            .map(PathBuf::from)
            .or_else(|| home.as_ref().map(|h| h.join(default)))
    };
    let read = |path: &Option<PathBuf>| -> Result<Option<String>, String> {
        match path {
            None => Ok(None),
            Some(p) => match std::fs::read_to_string(p) {
                Ok(t) => Ok(Some(t)),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
                Err(e) => Err(format!("cannot read {}: {e}", p.display())),
            },
        }
    };
    let cred_path = file("AWS_SHARED_CREDENTIALS_FILE", ".aws/credentials");
    let conf_path = file("AWS_CONFIG_FILE", ".aws/config");
    let creds = read(&cred_path)?.map(|t| parse(&t)).unwrap_or_default();
    let conf = read(&conf_path)?.map(|t| parse(&t)).unwrap_or_default();
    // The credentials file names sections by the profile; the config file says `profile NAME`
    // (but `default` for the default one).
    let c = creds.get(&name);
    let f = conf
        .get(&format!("profile {name}"))
        .or_else(|| (name == "default").then(|| conf.get("default")).flatten());
    if c.is_none() && f.is_none() && named.is_some() {
        let shown = |p: &Option<PathBuf>| p.as_ref().map(|p| p.display().to_string());
        return Err(format!(
            "AWS_PROFILE names profile {name:?}, which neither {} nor {} holds",
            shown(&cred_path).unwrap_or("the credentials file".into()),
            shown(&conf_path).unwrap_or("the config file".into())
        ));
    }
    let get = |key: &str| {
        c.and_then(|s| s.get(key))
            .or_else(|| f.and_then(|s| s.get(key)))
            .cloned()
    };
    let mut p = Profile::default();
    if env("AWS_ACCESS_KEY_ID").is_none() {
        p.access_key_id = get("aws_access_key_id");
        p.secret_access_key = get("aws_secret_access_key");
        p.session_token = get("aws_session_token");
    }
    if env("AWS_REGION").is_none() && env("AWS_DEFAULT_REGION").is_none() {
        p.region = f.and_then(|s| s.get("region")).cloned();
    }
    if env("AWS_ENDPOINT_URL").is_none() && env("AWS_ENDPOINT").is_none() {
        p.endpoint_url = f.and_then(|s| s.get("endpoint_url")).cloned();
    }
    Ok(p)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env_of(pairs: Vec<(&'static str, String)>) -> impl Fn(&str) -> Option<String> {
        move |k| pairs.iter().find(|(n, _)| *n == k).map(|(_, v)| v.clone())
    }

    #[test]
    fn a_profile_fills_in_what_the_environment_leaves_unset() {
        let t = tempfile::tempdir().unwrap();
        let aws = t.path().join(".aws");
        std::fs::create_dir(&aws).unwrap();
        std::fs::write(
            aws.join("credentials"),
            "[default]\naws_access_key_id = AKDEFAULT\naws_secret_access_key = s1\n\n\
             # the off-site store\n[offsite]\naws_access_key_id=AKOFF\naws_secret_access_key=s2\n",
        )
        .unwrap();
        std::fs::write(
            aws.join("config"),
            "[default]\nregion = eu-west-1\n[profile offsite]\nregion = garage\n\
             endpoint_url = http://10.0.0.5:3900\n",
        )
        .unwrap();
        let home = t.path().display().to_string();
        let p = resolve(&env_of(vec![("HOME", home.clone())])).unwrap();
        assert_eq!(p.access_key_id.as_deref(), Some("AKDEFAULT"));
        assert_eq!(p.region.as_deref(), Some("eu-west-1"));
        assert_eq!(p.endpoint_url, None);
        let p = resolve(&env_of(vec![
            ("HOME", home.clone()),
            ("AWS_PROFILE", "offsite".into()),
        ]))
        .unwrap();
        assert_eq!(p.access_key_id.as_deref(), Some("AKOFF"));
        assert_eq!(p.secret_access_key.as_deref(), Some("s2"));
        assert_eq!(p.region.as_deref(), Some("garage"));
        assert_eq!(p.endpoint_url.as_deref(), Some("http://10.0.0.5:3900"));
        // The environment wins.
        let p = resolve(&env_of(vec![
            ("HOME", home.clone()),
            ("AWS_PROFILE", "offsite".into()),
            ("AWS_ACCESS_KEY_ID", "AKENV".into()),
            ("AWS_ENDPOINT_URL", "http://127.0.0.1:9000".into()),
        ]))
        .unwrap();
        assert_eq!((p.access_key_id, p.endpoint_url), (None, None));
        assert_eq!(p.region.as_deref(), Some("garage"));
        // A profile no file holds is an error naming the files.
        let e = resolve(&env_of(vec![
            ("HOME", home),
            ("AWS_PROFILE", "nope".into()),
        ]))
        .unwrap_err();
        assert!(
            e.contains("\"nope\"") && e.contains(".aws/credentials"),
            "{e}"
        );
        // No files at all: nothing, no error.
        let p = resolve(&env_of(vec![("HOME", "/nonexistent".into())])).unwrap();
        assert_eq!(p, Profile::default());
    }
}
