//! A generic view of pg_query's parse tree, so the classifier can visit every node.
//!
//! pg_query hands out typed protobuf structs (about 270 node types) but only a partial walker
//! (`NodeEnum::nodes` skips many node types, e.g. array expressions, so a subquery inside
//! `ARRAY[...]` would go unseen). Every protobuf type derives `serde::Serialize`, and serde
//! passes each struct's type name to the serializer, so serializing into [`Tree`] gives a
//! complete, uniformly walkable copy that still knows which node is a `RangeVar`, a `FuncCall`
//! or a `DeleteStmt`, including nodes held in typed fields (`SelectStmt::larg`,
//! `InsertStmt::relation`) that the protobuf `Node` oneof never wraps.

use std::fmt;

use serde::ser::{self, Serialize};

/// The deepest [`Tree`] the builder accepts. prost already refuses protobuf messages nested
/// more than 100 deep, and each message is at most two levels here (the struct and a list), so
/// this is never reached by a tree pg_query decodes; it keeps the recursion bounded regardless.
pub(crate) const MAX_DEPTH: usize = 512;

/// One node of the copied parse tree.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Tree {
    /// A protobuf message: its Rust type name (`"SelectStmt"`) and its fields in order.
    Struct {
        name: &'static str,
        fields: Vec<(&'static str, Tree)>,
    },
    List(Vec<Tree>),
    Str(String),
    Int(i64),
    Bool(bool),
    /// An absent optional field, or a value the classifier never reads (floats).
    Absent,
}

impl Tree {
    /// Copies any pg_query protobuf value. The `Node` wrapper messages are dropped: a field
    /// holding a `Node` holds the wrapped node directly.
    pub(crate) fn build<T: Serialize + ?Sized>(value: &T) -> Result<Tree, TooDeep> {
        value.serialize(Builder { depth: 0 })
    }

    pub(crate) fn name(&self) -> Option<&'static str> {
        match self {
            Tree::Struct { name, .. } => Some(name),
            _ => None,
        }
    }

    pub(crate) fn field(&self, field: &str) -> &Tree {
        match self {
            Tree::Struct { fields, .. } => fields
                .iter()
                .find(|(name, _)| *name == field)
                .map_or(&Tree::Absent, |(_, value)| value),
            _ => &Tree::Absent,
        }
    }

    pub(crate) fn str(&self, field: &str) -> &str {
        match self.field(field) {
            Tree::Str(s) => s,
            _ => "",
        }
    }

    pub(crate) fn int(&self, field: &str) -> i64 {
        match self.field(field) {
            Tree::Int(i) => *i,
            _ => 0,
        }
    }

    pub(crate) fn bool(&self, field: &str) -> bool {
        matches!(self.field(field), Tree::Bool(true))
    }

    pub(crate) fn list(&self, field: &str) -> &[Tree] {
        match self.field(field) {
            Tree::List(items) => items,
            _ => &[],
        }
    }

    pub(crate) fn is_present(&self, field: &str) -> bool {
        !matches!(self.field(field), Tree::Absent)
    }

    /// The value of a `String` node (`{ sval }`), as pg_query spells identifiers in name lists.
    pub(crate) fn sval(&self) -> Option<&str> {
        match self {
            Tree::Struct { name: "String", .. } => Some(self.str("sval")),
            _ => None,
        }
    }
}

/// The tree nests deeper than [`MAX_DEPTH`].
#[derive(Debug)]
pub(crate) struct TooDeep;

impl fmt::Display for TooDeep {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "the parse tree nests deeper than {MAX_DEPTH} levels")
    }
}

impl std::error::Error for TooDeep {}

impl ser::Error for TooDeep {
    fn custom<M: fmt::Display>(_msg: M) -> Self {
        // The protobuf types serialize infallibly; the only error this builder raises is depth.
        TooDeep
    }
}

struct Builder {
    depth: usize,
}

impl Builder {
    fn nested(&self) -> Result<Builder, TooDeep> {
        if self.depth >= MAX_DEPTH {
            return Err(TooDeep);
        }
        Ok(Builder {
            depth: self.depth + 1,
        })
    }
}

struct SeqBuilder {
    child: usize,
    items: Vec<Tree>,
}

struct StructBuilder {
    child: usize,
    name: &'static str,
    fields: Vec<(&'static str, Tree)>,
}

/// Maps are absent from parse trees (one appears in pg_query's summary messages); their
/// entries are kept as a list so nothing inside is lost.
struct MapBuilder {
    child: usize,
    items: Vec<Tree>,
}

impl ser::Serializer for Builder {
    type Ok = Tree;
    type Error = TooDeep;
    type SerializeSeq = SeqBuilder;
    type SerializeTuple = SeqBuilder;
    type SerializeTupleStruct = SeqBuilder;
    type SerializeTupleVariant = SeqBuilder;
    type SerializeMap = MapBuilder;
    type SerializeStruct = StructBuilder;
    type SerializeStructVariant = StructBuilder;

    fn serialize_bool(self, v: bool) -> Result<Tree, TooDeep> {
        Ok(Tree::Bool(v))
    }
    fn serialize_i8(self, v: i8) -> Result<Tree, TooDeep> {
        Ok(Tree::Int(i64::from(v)))
    }
    fn serialize_i16(self, v: i16) -> Result<Tree, TooDeep> {
        Ok(Tree::Int(i64::from(v)))
    }
    fn serialize_i32(self, v: i32) -> Result<Tree, TooDeep> {
        Ok(Tree::Int(i64::from(v)))
    }
    fn serialize_i64(self, v: i64) -> Result<Tree, TooDeep> {
        Ok(Tree::Int(v))
    }
    fn serialize_u8(self, v: u8) -> Result<Tree, TooDeep> {
        Ok(Tree::Int(i64::from(v)))
    }
    fn serialize_u16(self, v: u16) -> Result<Tree, TooDeep> {
        Ok(Tree::Int(i64::from(v)))
    }
    fn serialize_u32(self, v: u32) -> Result<Tree, TooDeep> {
        Ok(Tree::Int(i64::from(v)))
    }
    fn serialize_u64(self, v: u64) -> Result<Tree, TooDeep> {
        // Only query ids and similar hashes are u64; none is read by the classifier.
        Ok(Tree::Int(i64::try_from(v).unwrap_or(i64::MAX)))
    }
    fn serialize_f32(self, _v: f32) -> Result<Tree, TooDeep> {
        Ok(Tree::Absent)
    }
    fn serialize_f64(self, _v: f64) -> Result<Tree, TooDeep> {
        Ok(Tree::Absent)
    }
    fn serialize_char(self, v: char) -> Result<Tree, TooDeep> {
        Ok(Tree::Str(v.to_string()))
    }
    fn serialize_str(self, v: &str) -> Result<Tree, TooDeep> {
        Ok(Tree::Str(v.to_owned()))
    }
    fn serialize_bytes(self, _v: &[u8]) -> Result<Tree, TooDeep> {
        Ok(Tree::Absent)
    }
    fn serialize_none(self) -> Result<Tree, TooDeep> {
        Ok(Tree::Absent)
    }
    fn serialize_some<T: Serialize + ?Sized>(self, value: &T) -> Result<Tree, TooDeep> {
        value.serialize(self)
    }
    fn serialize_unit(self) -> Result<Tree, TooDeep> {
        Ok(Tree::Absent)
    }
    fn serialize_unit_struct(self, _name: &'static str) -> Result<Tree, TooDeep> {
        Ok(Tree::Absent)
    }
    fn serialize_unit_variant(
        self,
        _name: &'static str,
        _index: u32,
        variant: &'static str,
    ) -> Result<Tree, TooDeep> {
        Ok(Tree::Str(variant.to_owned()))
    }
    fn serialize_newtype_struct<T: Serialize + ?Sized>(
        self,
        _name: &'static str,
        value: &T,
    ) -> Result<Tree, TooDeep> {
        value.serialize(self)
    }
    /// The protobuf oneofs (`node::Node`, `a_const::Val`): the variant wraps a message whose own
    /// struct name is what matters, so the variant level is transparent.
    fn serialize_newtype_variant<T: Serialize + ?Sized>(
        self,
        _name: &'static str,
        _index: u32,
        _variant: &'static str,
        value: &T,
    ) -> Result<Tree, TooDeep> {
        value.serialize(self)
    }
    fn serialize_seq(self, len: Option<usize>) -> Result<SeqBuilder, TooDeep> {
        Ok(SeqBuilder {
            child: self.nested()?.depth,
            items: Vec::with_capacity(len.unwrap_or(0)),
        })
    }
    fn serialize_tuple(self, len: usize) -> Result<SeqBuilder, TooDeep> {
        self.serialize_seq(Some(len))
    }
    fn serialize_tuple_struct(
        self,
        _name: &'static str,
        len: usize,
    ) -> Result<SeqBuilder, TooDeep> {
        self.serialize_seq(Some(len))
    }
    fn serialize_tuple_variant(
        self,
        _name: &'static str,
        _index: u32,
        _variant: &'static str,
        len: usize,
    ) -> Result<SeqBuilder, TooDeep> {
        self.serialize_seq(Some(len))
    }
    fn serialize_map(self, _len: Option<usize>) -> Result<MapBuilder, TooDeep> {
        Ok(MapBuilder {
            child: self.nested()?.depth,
            items: Vec::new(),
        })
    }
    fn serialize_struct(self, name: &'static str, len: usize) -> Result<StructBuilder, TooDeep> {
        Ok(StructBuilder {
            child: self.nested()?.depth,
            name,
            fields: Vec::with_capacity(len),
        })
    }
    fn serialize_struct_variant(
        self,
        _name: &'static str,
        _index: u32,
        variant: &'static str,
        len: usize,
    ) -> Result<StructBuilder, TooDeep> {
        self.serialize_struct(variant, len)
    }
}

impl ser::SerializeSeq for SeqBuilder {
    type Ok = Tree;
    type Error = TooDeep;
    fn serialize_element<T: Serialize + ?Sized>(&mut self, value: &T) -> Result<(), TooDeep> {
        self.items
            .push(value.serialize(Builder { depth: self.child })?);
        Ok(())
    }
    fn end(self) -> Result<Tree, TooDeep> {
        Ok(Tree::List(self.items))
    }
}

impl ser::SerializeTuple for SeqBuilder {
    type Ok = Tree;
    type Error = TooDeep;
    fn serialize_element<T: Serialize + ?Sized>(&mut self, value: &T) -> Result<(), TooDeep> {
        ser::SerializeSeq::serialize_element(self, value)
    }
    fn end(self) -> Result<Tree, TooDeep> {
        ser::SerializeSeq::end(self)
    }
}

impl ser::SerializeTupleStruct for SeqBuilder {
    type Ok = Tree;
    type Error = TooDeep;
    fn serialize_field<T: Serialize + ?Sized>(&mut self, value: &T) -> Result<(), TooDeep> {
        ser::SerializeSeq::serialize_element(self, value)
    }
    fn end(self) -> Result<Tree, TooDeep> {
        ser::SerializeSeq::end(self)
    }
}

impl ser::SerializeTupleVariant for SeqBuilder {
    type Ok = Tree;
    type Error = TooDeep;
    fn serialize_field<T: Serialize + ?Sized>(&mut self, value: &T) -> Result<(), TooDeep> {
        ser::SerializeSeq::serialize_element(self, value)
    }
    fn end(self) -> Result<Tree, TooDeep> {
        ser::SerializeSeq::end(self)
    }
}

impl ser::SerializeMap for MapBuilder {
    type Ok = Tree;
    type Error = TooDeep;
    fn serialize_key<T: Serialize + ?Sized>(&mut self, key: &T) -> Result<(), TooDeep> {
        self.items
            .push(key.serialize(Builder { depth: self.child })?);
        Ok(())
    }
    fn serialize_value<T: Serialize + ?Sized>(&mut self, value: &T) -> Result<(), TooDeep> {
        self.items
            .push(value.serialize(Builder { depth: self.child })?);
        Ok(())
    }
    fn end(self) -> Result<Tree, TooDeep> {
        Ok(Tree::List(self.items))
    }
}

impl ser::SerializeStruct for StructBuilder {
    type Ok = Tree;
    type Error = TooDeep;
    fn serialize_field<T: Serialize + ?Sized>(
        &mut self,
        key: &'static str,
        value: &T,
    ) -> Result<(), TooDeep> {
        let value = value.serialize(Builder { depth: self.child })?;
        self.fields.push((key, value));
        Ok(())
    }
    fn end(mut self) -> Result<Tree, TooDeep> {
        // `Node { node: Option<node::Node> }` only wraps the oneof: keep the wrapped node.
        if self.name == "Node" && self.fields.len() == 1 {
            if let Some((_, inner)) = self.fields.pop() {
                return Ok(inner);
            }
        }
        Ok(Tree::Struct {
            name: self.name,
            fields: self.fields,
        })
    }
}

impl ser::SerializeStructVariant for StructBuilder {
    type Ok = Tree;
    type Error = TooDeep;
    fn serialize_field<T: Serialize + ?Sized>(
        &mut self,
        key: &'static str,
        value: &T,
    ) -> Result<(), TooDeep> {
        ser::SerializeStruct::serialize_field(self, key, value)
    }
    fn end(self) -> Result<Tree, TooDeep> {
        ser::SerializeStruct::end(self)
    }
}
