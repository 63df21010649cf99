/* SPDX-License-Identifier: GPL-2.0 */
#ifndef KMT_PKGC_H
#define KMT_PKGC_H
int kmt_pkgc_hello(void);
#endif
