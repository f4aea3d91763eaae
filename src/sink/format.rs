//! Output formats other than JSON lines. Their batches are converted whole when sealed, on the
//! encoder pool: JSON lines (the buffer the batcher fills anyway) in, one object out. JSON lines
//! stay the fast path: nothing here runs unless another format is configured.

use serde::{Deserialize, Serialize};

use super::columnar::ColumnarError;
#[cfg(feature = "parquet")]
use super::columnar::{self, Layout, ParquetSpec};
use super::encode::{Codec, Compression, compress};
use super::flat::{Dialect, FlatSpec};
#[cfg(feature = "parquet")]
use super::ocsf::{self, parquet::Layouts};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    #[default]
    Json,
    Parquet,
    Csv,
    Tsv,
}

/// How a sealed batch becomes an object, for formats other than JSON lines.
#[derive(Debug)]
pub enum Converter {
    #[cfg(feature = "parquet")]
    Parquet {
        spec: ParquetSpec,
        layout: Layout,
    },
    /// OCSF records as Parquet, the schema following the batch's class.
    #[cfg(feature = "parquet")]
    OcsfParquet {
        spec: ParquetSpec,
        layouts: Layouts,
    },
    Flat(FlatSpec),
}

impl Converter {
    #[cfg(feature = "parquet")]
    pub fn parquet(spec: ParquetSpec) -> Converter {
        let layout = Layout::new(spec.lowercase, &spec.added);
        Converter::Parquet { spec, layout }
    }

    /// The object's bytes. Parquet compresses inside the file; text is compressed whole.
    pub fn encode(&self, codec: Codec, lines: &[u8]) -> Result<Vec<u8>, ColumnarError> {
        match self {
            #[cfg(feature = "parquet")]
            Converter::Parquet { spec, layout } => columnar::encode_parquet(spec, layout, lines),
            #[cfg(feature = "parquet")]
            Converter::OcsfParquet { spec, layouts } => ocsf::parquet::encode(spec, layouts, lines),
            Converter::Flat(f) => Ok(compress(codec, &f.encode(lines))?),
        }
    }

    pub fn extension(&self, codec: Codec) -> &'static str {
        let dialect = match self {
            #[cfg(feature = "parquet")]
            Converter::Parquet { .. } | Converter::OcsfParquet { .. } => return ".parquet",
            Converter::Flat(f) => f.dialect,
        };
        match (dialect, codec.kind) {
            (Dialect::Csv, Compression::Gzip) => ".csv.gz",
            (Dialect::Csv, Compression::Zstd) => ".csv.zst",
            (Dialect::Csv, _) => ".csv",
            (Dialect::Tsv, Compression::Gzip) => ".tsv.gz",
            (Dialect::Tsv, Compression::Zstd) => ".tsv.zst",
            (Dialect::Tsv, _) => ".tsv",
        }
    }

    pub fn content_type(&self, codec: Codec) -> &'static str {
        match (self, codec.kind) {
            #[cfg(feature = "parquet")]
            (Converter::Parquet { .. } | Converter::OcsfParquet { .. }, _) => {
                "application/vnd.apache.parquet"
            }
            (Converter::Flat(_), Compression::None | Compression::Snappy) => match self {
                Converter::Flat(FlatSpec {
                    dialect: Dialect::Tsv,
                    ..
                }) => "text/tab-separated-values",
                _ => "text/csv",
            },
            _ => codec.kind.content_type(),
        }
    }
}
