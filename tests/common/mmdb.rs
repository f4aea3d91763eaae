//! Tiny GeoIP2-schema mmdb databases for tests and the committed demo databases.
//!
//! [`write_city_db`] (GeoIP2/GeoLite2 City layout) covers exactly [`CITY_FIXTURES`]:
//!
//! | network           | city      | subdivision | country        | iso | latitude | longitude |
//! |-------------------|-----------|-------------|----------------|-----|----------|-----------|
//! | `81.2.69.0/24`    | London    | ENG         | United Kingdom | GB  | 51.5142  | -0.0931   |
//! | `89.160.20.0/24`  | Linköping | E           | Sweden         | SE  | 58.4167  | 15.6167   |
//! | `216.160.83.0/24` | Milton    | WA          | United States  | US  | 47.2513  | -122.3149 |
//! | `72.21.198.0/24`  | —         | —           | United States  | US  | —        | —         |
//! | `2001:db8:1::/48` | Tokyo     | 13          | Japan          | JP  | 35.6895  | 139.6917  |
//!
//! [`write_asn_db`] (GeoLite2-ASN layout) covers [`ASN_FIXTURES`]: `81.2.69.0/24` → 20712
//! "Andrews & Arnold Ltd", `89.160.20.0/24` → 29518 "Bredband2 AB", `72.21.198.0/24` → 16509
//! "AMAZON-02".
//!
//! [`write_demo_city_db`] / [`write_demo_asn_db`] add, for benchmarks, every network listed in
//! [`DEMO_RANGES`] (split into [`DEMO_V4_PREFIX`] / [`DEMO_V6_PREFIX`] blocks), so any address
//! drawn from those ranges is found. Their geo records are synthetic, cycled from
//! [`DEMO_CITIES`], and do not describe where those addresses really are.
//!
//! Output is deterministic (fixed build time), so regenerated files are byte-identical.
#![allow(dead_code)] // each test crate uses a different subset

use std::net::IpAddr;
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ipnet::IpNet;
use mmdb_writer::{Value, Writer};

/// One city-database fixture network.
#[derive(Debug, Clone, Copy)]
pub struct CityFixture {
    pub network: &'static str,
    /// An address inside `network`.
    pub sample_ip: &'static str,
    pub city: Option<&'static str>,
    pub subdivision_iso: Option<&'static str>,
    pub subdivision_name: Option<&'static str>,
    pub country: &'static str,
    pub country_iso: &'static str,
    pub continent: &'static str,
    /// (latitude, longitude)
    pub location: Option<(f64, f64)>,
}

/// One ASN-database fixture network.
#[derive(Debug, Clone, Copy)]
pub struct AsnFixture {
    pub network: &'static str,
    pub sample_ip: &'static str,
    pub asn: u32,
    pub org: &'static str,
}

pub const LONDON_IP: &str = "81.2.69.160";
pub const LINKOPING_IP: &str = "89.160.20.112";
pub const MILTON_IP: &str = "216.160.83.56";
/// Country-only record (no city, subdivision or location).
pub const US_COUNTRY_ONLY_IP: &str = "72.21.198.64";
pub const TOKYO_IP: &str = "2001:db8:1::1";
/// In no fixture or demo network.
pub const NOT_FOUND_IP: &str = "192.0.2.1";

pub const CITY_FIXTURES: &[CityFixture] = &[
    CityFixture {
        network: "81.2.69.0/24",
        sample_ip: LONDON_IP,
        city: Some("London"),
        subdivision_iso: Some("ENG"),
        subdivision_name: Some("England"),
        country: "United Kingdom",
        country_iso: "GB",
        continent: "EU",
        location: Some((51.5142, -0.0931)),
    },
    CityFixture {
        network: "89.160.20.0/24",
        sample_ip: LINKOPING_IP,
        city: Some("Linköping"),
        subdivision_iso: Some("E"),
        subdivision_name: Some("Östergötland County"),
        country: "Sweden",
        country_iso: "SE",
        continent: "EU",
        location: Some((58.4167, 15.6167)),
    },
    CityFixture {
        network: "216.160.83.0/24",
        sample_ip: MILTON_IP,
        city: Some("Milton"),
        subdivision_iso: Some("WA"),
        subdivision_name: Some("Washington"),
        country: "United States",
        country_iso: "US",
        continent: "NA",
        location: Some((47.2513, -122.3149)),
    },
    CityFixture {
        network: "72.21.198.0/24",
        sample_ip: US_COUNTRY_ONLY_IP,
        city: None,
        subdivision_iso: None,
        subdivision_name: None,
        country: "United States",
        country_iso: "US",
        continent: "NA",
        location: None,
    },
    CityFixture {
        network: "2001:db8:1::/48",
        sample_ip: TOKYO_IP,
        city: Some("Tokyo"),
        subdivision_iso: Some("13"),
        subdivision_name: Some("Tokyo"),
        country: "Japan",
        country_iso: "JP",
        continent: "AS",
        location: Some((35.6895, 139.6917)),
    },
];

pub const ASN_FIXTURES: &[AsnFixture] = &[
    AsnFixture {
        network: "81.2.69.0/24",
        sample_ip: LONDON_IP,
        asn: 20712,
        org: "Andrews & Arnold Ltd",
    },
    AsnFixture {
        network: "89.160.20.0/24",
        sample_ip: LINKOPING_IP,
        asn: 29518,
        org: "Bredband2 AB",
    },
    AsnFixture {
        network: "72.21.198.0/24",
        sample_ip: US_COUNTRY_ONLY_IP,
        asn: 16509,
        org: "AMAZON-02",
    },
];

/// Ranges fully covered by the demo databases (in addition to the fixtures). IPv4 ranges are
/// split into /[`DEMO_V4_PREFIX`] blocks and the IPv6 range into /[`DEMO_V6_PREFIX`] blocks;
/// block `i` (in address order, counting IPv4 ranges first) gets `DEMO_CITIES[i % len]`.
pub const DEMO_RANGES: &[&str] = &["3.0.0.0/8", "52.0.0.0/8", "54.0.0.0/8", "2600:1f00::/24"];
pub const DEMO_V4_PREFIX: u8 = 20;
pub const DEMO_V6_PREFIX: u8 = 36;
/// ASN given to every demo range in the demo ASN database.
pub const DEMO_ASN: (u32, &str) = (16509, "AMAZON-02");

/// Synthetic records cycled over the demo ranges; one is country-only, like many real records.
pub const DEMO_CITIES: &[CityFixture] = &[
    demo(
        Some("Ashburn"),
        Some(("VA", "Virginia")),
        "United States",
        "US",
        "NA",
        Some((39.0437, -77.4875)),
    ),
    demo(
        Some("Dublin"),
        Some(("L", "Leinster")),
        "Ireland",
        "IE",
        "EU",
        Some((53.3498, -6.2603)),
    ),
    demo(
        Some("Frankfurt am Main"),
        Some(("HE", "Hesse")),
        "Germany",
        "DE",
        "EU",
        Some((50.1109, 8.6821)),
    ),
    demo(
        Some("São Paulo"),
        Some(("SP", "São Paulo")),
        "Brazil",
        "BR",
        "SA",
        Some((-23.5505, -46.6333)),
    ),
    demo(
        Some("Tokyo"),
        Some(("13", "Tokyo")),
        "Japan",
        "JP",
        "AS",
        Some((35.6895, 139.6917)),
    ),
    demo(None, None, "United States", "US", "NA", None),
    demo(
        Some("Sydney"),
        Some(("NSW", "New South Wales")),
        "Australia",
        "AU",
        "OC",
        Some((-33.8688, 151.2093)),
    ),
    demo(
        Some("Montréal"),
        Some(("QC", "Quebec")),
        "Canada",
        "CA",
        "NA",
        Some((45.5019, -73.5674)),
    ),
];

const fn demo(
    city: Option<&'static str>,
    subdivision: Option<(&'static str, &'static str)>,
    country: &'static str,
    country_iso: &'static str,
    continent: &'static str,
    location: Option<(f64, f64)>,
) -> CityFixture {
    let (subdivision_iso, subdivision_name) = match subdivision {
        Some((iso, name)) => (Some(iso), Some(name)),
        None => (None, None),
    };
    CityFixture {
        network: "",
        sample_ip: "",
        city,
        subdivision_iso,
        subdivision_name,
        country,
        country_iso,
        continent,
        location,
    }
}

/// Writes the fixture city database.
pub fn write_city_db(path: &Path) {
    let mut w = writer(
        "trailhose-Test-City",
        "trailhose test city database (fake data)",
    );
    insert_city_fixtures(&mut w);
    save(&w, path);
}

/// Writes the fixture ASN database.
pub fn write_asn_db(path: &Path) {
    let mut w = writer(
        "trailhose-Test-ASN",
        "trailhose test ASN database (fake data)",
    );
    insert_asn_fixtures(&mut w);
    save(&w, path);
}

/// Writes the fixtures plus the synthetic [`DEMO_RANGES`] coverage.
pub fn write_demo_city_db(path: &Path) {
    let mut w = writer(
        "trailhose-Demo-City",
        "trailhose demo city database (fake data)",
    );
    for (i, net) in demo_networks().into_iter().enumerate() {
        let record = city_record(&DEMO_CITIES[i % DEMO_CITIES.len()]);
        w.insert_value(net, record).expect("insert demo network");
    }
    insert_city_fixtures(&mut w);
    save(&w, path);
}

/// Writes the ASN fixtures plus [`DEMO_ASN`] for every [`DEMO_RANGES`] network.
pub fn write_demo_asn_db(path: &Path) {
    let mut w = writer(
        "trailhose-Demo-ASN",
        "trailhose demo ASN database (fake data)",
    );
    for range in DEMO_RANGES {
        w.insert_value(net(range), asn_record(DEMO_ASN.0, DEMO_ASN.1))
            .expect("insert demo network");
    }
    insert_asn_fixtures(&mut w);
    save(&w, path);
}

/// The city fixture whose network contains `ip`, if any (fixtures only, not demo ranges).
pub fn city_fixture(ip: IpAddr) -> Option<&'static CityFixture> {
    CITY_FIXTURES.iter().find(|f| net(f.network).contains(&ip))
}

/// The ASN fixture whose network contains `ip`, if any.
pub fn asn_fixture(ip: IpAddr) -> Option<&'static AsnFixture> {
    ASN_FIXTURES.iter().find(|f| net(f.network).contains(&ip))
}

/// The exact `"geo":{...}` fragment trailhose should produce for `ip` with the fixture city
/// database and, when `with_asn`, the fixture ASN database; None when neither has it.
pub fn expected_geo(ip: IpAddr, with_asn: bool) -> Option<String> {
    let mut members = Vec::new();
    if let Some(c) = city_fixture(ip) {
        if let Some((lat, lon)) = c.location {
            members.push(format!("\"latitude\":{}", json(&lat)));
            members.push(format!("\"longitude\":{}", json(&lon)));
        }
        if let Some(city) = c.city {
            members.push(format!("\"city\":{}", json(city)));
        }
        if let Some(iso) = c.subdivision_iso {
            members.push(format!("\"subdivision_isocode\":{}", json(iso)));
        }
        members.push(format!("\"country\":{}", json(c.country)));
        members.push(format!("\"country_isocode\":{}", json(c.country_iso)));
    }
    if let Some(a) = asn_fixture(ip).filter(|_| with_asn) {
        members.push(format!("\"asn\":{}", a.asn));
        members.push(format!("\"as_org\":{}", json(a.org)));
    }
    (!members.is_empty()).then(|| format!("\"geo\":{{{}}}", members.join(",")))
}

fn json<T: serde::Serialize + ?Sized>(v: &T) -> String {
    serde_json::to_string(v).expect("JSON-encode a fixture value")
}

fn writer(database_type: &str, description: &str) -> Writer {
    Writer::builder(database_type)
        .description(&[("en", description)])
        .build_epoch(build_time())
        .build()
}

fn insert_city_fixtures(w: &mut Writer) {
    for f in CITY_FIXTURES {
        w.insert_value(net(f.network), city_record(f))
            .expect("insert city fixture");
    }
}

fn insert_asn_fixtures(w: &mut Writer) {
    for f in ASN_FIXTURES {
        w.insert_value(net(f.network), asn_record(f.asn, f.org))
            .expect("insert ASN fixture");
    }
}

fn save(w: &Writer, path: &Path) {
    let bytes = w.to_bytes().expect("serialise mmdb");
    std::fs::write(path, bytes).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
}

fn net(s: &str) -> IpNet {
    s.parse().unwrap_or_else(|e| panic!("bad network {s}: {e}"))
}

/// A GeoIP2 place: `{iso_code, names: {en}}`.
fn place(iso_code: &str, name: &str) -> Value {
    Value::map([
        ("iso_code", Value::from(iso_code)),
        ("names", Value::map([("en", name)])),
    ])
}

/// A GeoIP2 City record; a fixture without city and location is a Country-style record.
fn city_record(f: &CityFixture) -> Value {
    let country = place(f.country_iso, f.country);
    let mut entries = vec![
        ("continent", Value::map([("code", f.continent)])),
        ("country", country.clone()),
        ("registered_country", country),
    ];
    if let Some(city) = f.city {
        entries.push(("city", Value::map([("names", Value::map([("en", city)]))])));
    }
    if let Some((lat, lon)) = f.location {
        let location = Value::map([
            ("accuracy_radius", Value::from(100u16)),
            ("latitude", Value::from(lat)),
            ("longitude", Value::from(lon)),
        ]);
        entries.push(("location", location));
    }
    if let (Some(iso), Some(name)) = (f.subdivision_iso, f.subdivision_name) {
        entries.push(("subdivisions", Value::array([place(iso, name)])));
    }
    Value::map(entries)
}

fn asn_record(asn: u32, org: &str) -> Value {
    Value::map([
        ("autonomous_system_number", Value::from(asn)),
        ("autonomous_system_organization", Value::from(org)),
    ])
}

/// Every demo block, IPv4 ranges first, each range in address order.
fn demo_networks() -> Vec<IpNet> {
    DEMO_RANGES
        .iter()
        .flat_map(|range| {
            let range = net(range);
            let prefix = match range {
                IpNet::V4(_) => DEMO_V4_PREFIX,
                IpNet::V6(_) => DEMO_V6_PREFIX,
            };
            range
                .subnets(prefix)
                .expect("demo prefix is longer than its range")
        })
        .collect()
}

/// Build time written into every database here; fixed so that output is byte-identical.
pub fn build_time() -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(1_767_225_600)
}
