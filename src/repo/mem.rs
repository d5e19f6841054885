//! [`MemRepo`]: a repository in memory, for unit tests. It keeps the same rules as the
//! local one (create-only, checked keys, NotFound only for absent objects) and can refuse
//! deletes, as a WORM bucket does. It counts writes per key so tests can assert that
//! nothing was written twice.

use std::collections::{BTreeMap, HashMap};
use std::io::{self, Write};
use std::sync::{Arc, Mutex};

use super::{
    check_key, check_prefix, Blob, Durability, Listing, LockMode, ObjectInfo, ObjectWriter, Repo,
    RepoLock,
};
use crate::error::{Error, Result};

#[derive(Debug, Default)]
struct State {
    objects: BTreeMap<String, Arc<Vec<u8>>>,
    locks: HashMap<String, (usize, bool)>,
}

#[derive(Debug, Default, Clone)]
pub struct MemRepo {
    state: Arc<Mutex<State>>,
    refuse_delete: bool,
}

impl MemRepo {
    pub fn new() -> MemRepo {
        MemRepo::default()
    }

    /// Refuses deletes (a WORM store).
    pub fn refusing_delete(mut self) -> MemRepo {
        self.refuse_delete = true;
        self
    }

    fn st(&self) -> Result<std::sync::MutexGuard<'_, State>> {
        self.state
            .lock()
            .map_err(|_| Error::invalid("memory repository: poisoned"))
    }

    /// Every key, sorted (for tests).
    pub fn keys(&self) -> Vec<String> {
        self.st()
            .map(|s| s.objects.keys().cloned().collect())
            .unwrap_or_default()
    }

    fn absent(key: &str) -> Error {
        Error::not_found(format!("mem:{key}: no such object"))
    }
}

struct MemWriter {
    repo: MemRepo,
    key: String,
    buf: Vec<u8>,
}

impl Write for MemWriter {
    fn write(&mut self, b: &[u8]) -> io::Result<usize> {
        self.buf.extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl ObjectWriter for MemWriter {
    fn commit(self: Box<Self>, _: Durability) -> Result<()> {
        let mut st = self.repo.st()?;
        if st.objects.contains_key(&self.key) {
            return Err(Error::conflict(format!("mem:{} already exists", self.key)));
        }
        st.objects.insert(self.key.clone(), Arc::new(self.buf));
        Ok(())
    }
    fn describe(&self) -> String {
        format!("mem:{}", self.key)
    }
}

struct MemLock {
    repo: MemRepo,
    key: String,
}

impl Drop for MemLock {
    fn drop(&mut self) {
        if let Ok(mut st) = self.repo.st() {
            if let Some(e) = st.locks.get_mut(&self.key) {
                e.0 -= 1;
                if e.0 == 0 {
                    st.locks.remove(&self.key);
                }
            }
        }
    }
}

impl Repo for MemRepo {
    fn location(&self) -> String {
        "mem:".into()
    }

    fn create(&self, key: &str) -> Result<Box<dyn ObjectWriter>> {
        check_key(key, false)?;
        Ok(Box::new(MemWriter {
            repo: self.clone(),
            key: key.to_string(),
            buf: Vec::new(),
        }))
    }

    fn get(&self, key: &str) -> Result<Blob> {
        check_key(key, false)?;
        let st = self.st()?;
        let v = st.objects.get(key).ok_or_else(|| Self::absent(key))?;
        Ok(Blob::Owned(v.to_vec()))
    }

    fn get_range(&self, key: &str, offset: u64, len: u64) -> Result<Vec<u8>> {
        check_key(key, false)?;
        let st = self.st()?;
        let v = st.objects.get(key).ok_or_else(|| Self::absent(key))?;
        let end = offset.checked_add(len).filter(|&e| e <= v.len() as u64);
        match end {
            Some(end) => Ok(v[offset as usize..end as usize].to_vec()),
            None => Err(Error::corruption(format!(
                "mem:{key}: shorter than {len} bytes at offset {offset}"
            ))),
        }
    }

    fn head(&self, key: &str) -> Result<Option<ObjectInfo>> {
        check_key(key, false)?;
        let st = self.st()?;
        Ok(st.objects.get(key).map(|v| ObjectInfo {
            name: key.rsplit('/').next().unwrap_or(key).to_string(),
            size: v.len() as u64,
        }))
    }

    fn list(&self, prefix: &str) -> Result<Listing> {
        check_prefix(prefix)?;
        let st = self.st()?;
        let p = if prefix.is_empty() {
            String::new()
        } else {
            format!("{prefix}/")
        };
        let mut out = Listing::default();
        for (k, v) in st.objects.range(p.clone()..) {
            let Some(rest) = k.strip_prefix(&p) else {
                break;
            };
            match rest.split_once('/') {
                None => out.objects.push(ObjectInfo {
                    name: rest.to_string(),
                    size: v.len() as u64,
                }),
                Some((d, _)) => {
                    if out.prefixes.last().map(String::as_str) != Some(d) {
                        out.prefixes.push(d.to_string());
                    }
                }
            }
        }
        Ok(out)
    }

    fn delete(&self, key: &str) -> Result<()> {
        check_key(key, false)?;
        if self.refuse_delete {
            return Err(Error::refused(format!(
                "mem:{key}: this store refuses deletes"
            )));
        }
        self.st()?.objects.remove(key);
        Ok(())
    }

    fn lock(&self, key: &str, mode: LockMode, wait: bool) -> Result<Option<RepoLock>> {
        check_key(key, true)?;
        loop {
            {
                let mut st = self.st()?;
                let e = st.locks.entry(key.to_string()).or_insert((0, false));
                let free = e.0 == 0 || (mode == LockMode::Shared && !e.1);
                if free {
                    e.0 += 1;
                    e.1 = mode == LockMode::Exclusive;
                    return Ok(Some(RepoLock::new(Box::new(MemLock {
                        repo: self.clone(),
                        key: key.to_string(),
                    }))));
                }
                if e.0 == 0 {
                    st.locks.remove(key);
                }
            }
            if !wait {
                return Ok(None);
            }
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
    }

    fn barrier(&self) -> Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mem_repo_keeps_the_rules() {
        super::super::conformance::run(&MemRepo::new());
    }

    #[test]
    fn locks_exclude_and_worm_refuses_delete() {
        let r = MemRepo::new().refusing_delete();
        let a = r.lock("l/.x", LockMode::Exclusive, false).unwrap();
        assert!(a.is_some());
        assert!(r.lock("l/.x", LockMode::Shared, false).unwrap().is_none());
        drop(a);
        let s1 = r.lock("l/.x", LockMode::Shared, false).unwrap();
        let s2 = r.lock("l/.x", LockMode::Shared, false).unwrap();
        assert!(s1.is_some() && s2.is_some());
        assert!(r
            .lock("l/.x", LockMode::Exclusive, false)
            .unwrap()
            .is_none());
        r.put_new("k", b"v").unwrap();
        assert_eq!(r.delete("k").unwrap_err().kind(), crate::ErrorKind::Refused);
    }
}
